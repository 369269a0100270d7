//! A built-in 5×7 bitmap font for labelling preview grids (no font files, no text-rendering dependency).
//!
//! Printable ASCII (`' '`..=`'~'`); typographic quotes, dashes and the ellipsis are drawn as their ASCII
//! forms, any other character as `?`. Each glyph is 5 columns × 7 rows above the baseline plus one
//! descender row (8 rows of 5 bits, bit 4 = leftmost column): capitals and digits fill rows 0–6, lowercase
//! letters rows 2–6, `g j p q y , ;` reach row 7. Glyphs advance by 6 columns (one blank column between
//! letters) and lines by 10 rows, times an integer `scale`.

/// Glyph width in font pixels.
pub const GLYPH_W: u32 = 5;
/// Glyph height in font pixels (7 above the baseline + 1 descender row).
pub const GLYPH_H: u32 = 8;
/// Horizontal advance per character (glyph + 1 blank column).
pub const ADVANCE: u32 = GLYPH_W + 1;
/// Vertical advance per line (glyph + 2 blank rows).
pub const LINE: u32 = GLYPH_H + 2;

/// ASCII stand-ins for common typographic characters.
fn ascii_fold(c: char) -> char {
    match c {
        '\u{2018}' | '\u{2019}' | '\u{201a}' | '\u{2032}' => '\'',
        '\u{201c}' | '\u{201d}' | '\u{201e}' | '\u{2033}' => '"',
        '\u{2010}'..='\u{2015}' | '\u{2212}' => '-',
        '\u{a0}' | '\u{2002}'..='\u{200a}' => ' ',
        _ => c,
    }
}

/// Glyphs of `' '` (0x20) to `'~'` (0x7E), in order.
#[rustfmt::skip]
const GLYPHS: [[u8; 8]; 95] = [
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // space
    [0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000, 0b00100, 0b00000], // !
    [0b01010, 0b01010, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // "
    [0b01010, 0b01010, 0b11111, 0b01010, 0b11111, 0b01010, 0b01010, 0b00000], // #
    [0b00100, 0b01111, 0b10100, 0b01110, 0b00101, 0b11110, 0b00100, 0b00000], // $
    [0b11000, 0b11001, 0b00010, 0b00100, 0b01000, 0b10011, 0b00011, 0b00000], // %
    [0b01100, 0b10010, 0b10100, 0b01000, 0b10101, 0b10010, 0b01101, 0b00000], // &
    [0b00100, 0b00100, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // '
    [0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00100, 0b00010, 0b00000], // (
    [0b01000, 0b00100, 0b00010, 0b00010, 0b00010, 0b00100, 0b01000, 0b00000], // )
    [0b00000, 0b00100, 0b10101, 0b01110, 0b10101, 0b00100, 0b00000, 0b00000], // *
    [0b00000, 0b00100, 0b00100, 0b11111, 0b00100, 0b00100, 0b00000, 0b00000], // +
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b00100, 0b01000], // ,
    [0b00000, 0b00000, 0b00000, 0b11111, 0b00000, 0b00000, 0b00000, 0b00000], // -
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b01100, 0b00000], // .
    [0b00000, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b00000, 0b00000], // /
    [0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110, 0b00000], // 0
    [0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000], // 1
    [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111, 0b00000], // 2
    [0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110, 0b00000], // 3
    [0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010, 0b00000], // 4
    [0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110, 0b00000], // 5
    [0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110, 0b00000], // 6
    [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00000], // 7
    [0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110, 0b00000], // 8
    [0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100, 0b00000], // 9
    [0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b01100, 0b00000, 0b00000], // :
    [0b00000, 0b01100, 0b01100, 0b00000, 0b00000, 0b01100, 0b00100, 0b01000], // ;
    [0b00010, 0b00100, 0b01000, 0b10000, 0b01000, 0b00100, 0b00010, 0b00000], // <
    [0b00000, 0b00000, 0b11111, 0b00000, 0b11111, 0b00000, 0b00000, 0b00000], // =
    [0b01000, 0b00100, 0b00010, 0b00001, 0b00010, 0b00100, 0b01000, 0b00000], // >
    [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b00000, 0b00100, 0b00000], // ?
    [0b01110, 0b10001, 0b00001, 0b01101, 0b10101, 0b10101, 0b01110, 0b00000], // @
    [0b01110, 0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b00000], // A
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110, 0b00000], // B
    [0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110, 0b00000], // C
    [0b11100, 0b10010, 0b10001, 0b10001, 0b10001, 0b10010, 0b11100, 0b00000], // D
    [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111, 0b00000], // E
    [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000, 0b00000], // F
    [0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111, 0b00000], // G
    [0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001, 0b00000], // H
    [0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000], // I
    [0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100, 0b00000], // J
    [0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001, 0b00000], // K
    [0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111, 0b00000], // L
    [0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001, 0b00000], // M
    [0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001, 0b00000], // N
    [0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110, 0b00000], // O
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000, 0b00000], // P
    [0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101, 0b00000], // Q
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001, 0b00000], // R
    [0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110, 0b00000], // S
    [0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000], // T
    [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110, 0b00000], // U
    [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00000], // V
    [0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010, 0b00000], // W
    [0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001, 0b00000], // X
    [0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100, 0b00000], // Y
    [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111, 0b00000], // Z
    [0b01110, 0b01000, 0b01000, 0b01000, 0b01000, 0b01000, 0b01110, 0b00000], // [
    [0b00000, 0b10000, 0b01000, 0b00100, 0b00010, 0b00001, 0b00000, 0b00000], // \
    [0b01110, 0b00010, 0b00010, 0b00010, 0b00010, 0b00010, 0b01110, 0b00000], // ]
    [0b00100, 0b01010, 0b10001, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // ^
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b11111, 0b00000], // _
    [0b01000, 0b00100, 0b00010, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // `
    [0b00000, 0b00000, 0b01110, 0b00001, 0b01111, 0b10001, 0b01111, 0b00000], // a
    [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b11110, 0b00000], // b
    [0b00000, 0b00000, 0b01110, 0b10000, 0b10000, 0b10001, 0b01110, 0b00000], // c
    [0b00001, 0b00001, 0b01101, 0b10011, 0b10001, 0b10001, 0b01111, 0b00000], // d
    [0b00000, 0b00000, 0b01110, 0b10001, 0b11111, 0b10000, 0b01110, 0b00000], // e
    [0b00110, 0b01001, 0b01000, 0b11100, 0b01000, 0b01000, 0b01000, 0b00000], // f
    [0b00000, 0b00000, 0b01111, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110], // g
    [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001, 0b00000], // h
    [0b00100, 0b00000, 0b01100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000], // i
    [0b00010, 0b00000, 0b00110, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100], // j
    [0b10000, 0b10000, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b00000], // k
    [0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000], // l
    [0b00000, 0b00000, 0b11010, 0b10101, 0b10101, 0b10001, 0b10001, 0b00000], // m
    [0b00000, 0b00000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001, 0b00000], // n
    [0b00000, 0b00000, 0b01110, 0b10001, 0b10001, 0b10001, 0b01110, 0b00000], // o
    [0b00000, 0b00000, 0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000], // p
    [0b00000, 0b00000, 0b01111, 0b10001, 0b10001, 0b01111, 0b00001, 0b00001], // q
    [0b00000, 0b00000, 0b10110, 0b11001, 0b10000, 0b10000, 0b10000, 0b00000], // r
    [0b00000, 0b00000, 0b01110, 0b10000, 0b01110, 0b00001, 0b11110, 0b00000], // s
    [0b01000, 0b01000, 0b11100, 0b01000, 0b01000, 0b01001, 0b00110, 0b00000], // t
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b10011, 0b01101, 0b00000], // u
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00000], // v
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10101, 0b10101, 0b01010, 0b00000], // w
    [0b00000, 0b00000, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b00000], // x
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110], // y
    [0b00000, 0b00000, 0b11111, 0b00010, 0b00100, 0b01000, 0b11111, 0b00000], // z
    [0b00010, 0b00100, 0b00100, 0b01000, 0b00100, 0b00100, 0b00010, 0b00000], // {
    [0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000], // |
    [0b01000, 0b00100, 0b00100, 0b00010, 0b00100, 0b00100, 0b01000, 0b00000], // }
    [0b00000, 0b00000, 0b01000, 0b10101, 0b00010, 0b00000, 0b00000, 0b00000], // ~
];

/// The 8 rows of `c` (bit 4 = leftmost column); `?` for characters outside printable ASCII.
pub fn glyph(c: char) -> [u8; 8] {
    let i = match ascii_fold(c) {
        a @ ' '..='~' => a as usize - 0x20,
        _ => '?' as usize - 0x20,
    };
    GLYPHS[i]
}

/// `text` with `…` spelled `...` (one glyph per character otherwise).
fn fold_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\u{2026}') {
        text.replace('\u{2026}', "...").into()
    } else {
        text.into()
    }
}

/// Width in image pixels of `text` on one line (no trailing blank column).
pub fn text_width(text: &str, scale: u32) -> u32 {
    let n = fold_text(text).chars().count() as u32;
    (n * ADVANCE).saturating_sub(1) * scale
}

/// How many characters fit in `width` pixels.
pub fn chars_fitting(width: u32, scale: u32) -> usize {
    ((width / scale.max(1) + 1) / ADVANCE) as usize
}

/// Draws `text` with its top-left corner at `(x, y)` in `color`; pixels outside the image are skipped.
/// Returns the x just past the last character.
pub fn draw_text(
    img: &mut image::RgbImage,
    x: i64,
    y: i64,
    text: &str,
    scale: u32,
    color: image::Rgb<u8>,
) -> i64 {
    let s = i64::from(scale.max(1));
    let (w, h) = (i64::from(img.width()), i64::from(img.height()));
    let mut cx = x;
    for c in fold_text(text).chars() {
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..GLYPH_W {
                if bits & (1 << (GLYPH_W - 1 - col)) == 0 {
                    continue;
                }
                let (px, py) = (cx + i64::from(col) * s, y + row as i64 * s);
                for dy in 0..s {
                    for dx in 0..s {
                        let (xx, yy) = (px + dx, py + dy);
                        if (0..w).contains(&xx) && (0..h).contains(&yy) {
                            img.put_pixel(xx as u32, yy as u32, color);
                        }
                    }
                }
            }
        }
        cx += i64::from(ADVANCE) * s;
    }
    cx
}

/// Greedy word wrap to lines of at most `max_chars` characters (words longer than a line are split;
/// runs of whitespace collapse to one space).
pub fn wrap(text: &str, max_chars: usize) -> Vec<String> {
    let max = max_chars.max(1);
    let mut lines = Vec::new();
    let mut cur = String::new();
    let mut cur_len = 0;
    for word in text.split_whitespace() {
        let mut chars: Vec<char> = word.chars().collect();
        while !chars.is_empty() {
            let room = if cur_len == 0 {
                max
            } else {
                max.saturating_sub(cur_len + 1)
            };
            if chars.len() <= room {
                if cur_len > 0 {
                    cur.push(' ');
                    cur_len += 1;
                }
                cur.extend(chars.iter());
                cur_len += chars.len();
                chars.clear();
            } else if cur_len > 0 {
                lines.push(std::mem::take(&mut cur));
                cur_len = 0;
            } else {
                let rest = chars.split_off(max);
                lines.push(chars.iter().collect());
                chars = rest;
            }
        }
    }
    if cur_len > 0 {
        lines.push(cur);
    }
    lines
}

/// [`wrap`] keeping at most `max_lines` lines; a cut ends with `...`.
pub fn wrap_lines(text: &str, max_chars: usize, max_lines: usize) -> Vec<String> {
    let mut lines = wrap(text, max_chars);
    if lines.len() > max_lines && max_lines > 0 {
        lines.truncate(max_lines);
        let last = &mut lines[max_lines - 1];
        let keep = max_chars.max(3) - 3;
        if last.chars().count() > keep {
            *last = last.chars().take(keep).collect();
        }
        last.push_str("...");
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(text: &str) -> Vec<String> {
        let mut img = image::RgbImage::new(text_width(text, 1), GLYPH_H);
        draw_text(&mut img, 0, 0, text, 1, image::Rgb([255, 255, 255]));
        (0..GLYPH_H)
            .map(|y| {
                (0..img.width())
                    .map(|x| if img.get_pixel(x, y)[0] > 0 { '#' } else { '.' })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn draws_glyph_rows_left_to_right() {
        assert_eq!(
            render("Hi"),
            [
                "#...#...#..",
                "#...#......",
                "#...#..##..",
                "#####...#..",
                "#...#...#..",
                "#...#...#..",
                "#...#..###.",
                "...........",
            ]
        );
    }

    #[test]
    fn every_printable_glyph_is_distinct_and_non_ascii_is_a_question_mark() {
        let mut seen = std::collections::HashSet::new();
        for c in '!'..='~' {
            let g = glyph(c);
            assert!(g.iter().any(|&r| r != 0), "{c:?} is blank");
            assert!(g.iter().all(|&r| r < 32), "{c:?} is wider than 5");
            assert!(seen.insert(g), "{c:?} duplicates another glyph");
        }
        assert_eq!(glyph(' '), [0; 8]);
        assert_eq!(glyph('é'), glyph('?'));
        assert_eq!(glyph('\n'), glyph('?'));
        assert_eq!(glyph('\u{2014}'), glyph('-'));
        assert_eq!(glyph('\u{2019}'), glyph('\''));
        assert_eq!(text_width("a\u{2026}", 1), text_width("a...", 1));
        // Descenders use the last row; capitals do not.
        for c in ['g', 'j', 'p', 'q', 'y'] {
            assert_ne!(glyph(c)[7], 0, "{c}");
        }
        for c in 'A'..='Z' {
            assert_eq!(glyph(c)[7], 0, "{c}");
        }
    }

    #[test]
    fn scaled_text_and_clipping() {
        assert_eq!(text_width("abc", 2), (3 * 6 - 1) * 2);
        assert_eq!(text_width("", 3), 0);
        assert_eq!(chars_fitting(text_width("abcd", 2), 2), 4);
        assert_eq!(chars_fitting(text_width("abcd", 2) - 1, 2), 3);
        let mut img = image::RgbImage::new(8, 8);
        // Partly outside on every side: no panic, something drawn.
        let end = draw_text(&mut img, -3, -2, "MW", 2, image::Rgb([9, 9, 9]));
        assert_eq!(end, -3 + 2 * 12);
        assert!(img.pixels().any(|p| p[0] == 9));
    }

    #[test]
    fn word_wrap() {
        assert_eq!(
            wrap("a photo of a  dog\non the beach", 10),
            ["a photo of", "a dog on", "the beach"]
        );
        assert_eq!(wrap("abcdefghij klm", 4), ["abcd", "efgh", "ij", "klm"]);
        assert!(wrap("   ", 5).is_empty());
        let cut = wrap_lines("one two three four five six", 9, 2);
        assert_eq!(cut, ["one two", "three..."]);
        assert!(cut.iter().all(|l| l.chars().count() <= 9));
    }
}
