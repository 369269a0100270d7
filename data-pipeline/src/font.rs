//! Text for labelling preview grids: DejaVu Sans (embedded by the `dejavu` crate, the font the loss
//! plots use) rasterised by `ab_glyph` — proportional, anti-aliased, kerned, any character the font
//! has (Latin, Greek, Cyrillic, most symbols); no font file is read at run time.

use ab_glyph::{point, Font as _, FontRef, PxScale, ScaleFont};

/// DejaVu Sans at one pixel size.
#[derive(Clone, Debug)]
pub struct TextStyle {
    font: FontRef<'static>,
    scale: PxScale,
}

impl TextStyle {
    /// DejaVu Sans, `px` pixels from the top of the tallest glyph to the bottom of the deepest.
    pub fn new(px: f32) -> Self {
        let font = FontRef::try_from_slice(dejavu::sans::regular())
            .expect("the embedded DejaVu Sans parses");
        Self {
            font,
            scale: PxScale::from(px.max(1.0)),
        }
    }

    /// Pixels from one line's top to the next's.
    pub fn line_height(&self) -> u32 {
        let f = self.font.as_scaled(self.scale);
        (f.height() + f.line_gap()).ceil() as u32
    }

    /// Width in pixels of `text` on one line (advances and kerning).
    pub fn width(&self, text: &str) -> u32 {
        let f = self.font.as_scaled(self.scale);
        let mut x = 0.0f32;
        let mut prev = None;
        for c in text.chars() {
            let id = f.glyph_id(c);
            if let Some(p) = prev {
                x += f.kern(p, id);
            }
            x += f.h_advance(id);
            prev = Some(id);
        }
        x.ceil() as u32
    }

    /// Draws `text` with the top of its line at `(x, y)`, blending `color` over the image by each
    /// pixel's coverage; pixels outside the image are skipped. Returns the x just past the text.
    pub fn draw(
        &self,
        img: &mut image::RgbImage,
        x: i64,
        y: i64,
        text: &str,
        color: image::Rgb<u8>,
    ) -> i64 {
        let f = self.font.as_scaled(self.scale);
        let (w, h) = (i64::from(img.width()), i64::from(img.height()));
        let baseline = y as f32 + f.ascent();
        let mut cx = x as f32;
        let mut prev = None;
        for c in text.chars() {
            let id = f.glyph_id(c);
            if let Some(p) = prev {
                cx += f.kern(p, id);
            }
            let glyph = id.with_scale_and_position(self.scale, point(cx, baseline));
            cx += f.h_advance(id);
            prev = Some(id);
            let Some(outline) = self.font.outline_glyph(glyph) else {
                continue; // a space
            };
            let b = outline.px_bounds();
            outline.draw(|gx, gy, coverage| {
                let (px, py) = (
                    b.min.x as i64 + i64::from(gx),
                    b.min.y as i64 + i64::from(gy),
                );
                if !(0..w).contains(&px) || !(0..h).contains(&py) {
                    return;
                }
                let a = coverage.clamp(0.0, 1.0);
                let p = img.get_pixel_mut(px as u32, py as u32);
                for k in 0..3 {
                    let v = f32::from(p[k]) * (1.0 - a) + f32::from(color[k]) * a;
                    p[k] = v.round() as u8;
                }
            });
        }
        cx.ceil() as i64
    }

    /// Greedy word wrap to lines at most `max_width` pixels wide (a word wider than a line is split
    /// between characters; runs of whitespace collapse to one space), at most `max_lines` lines; a cut
    /// ends with `…`.
    pub fn wrap(&self, text: &str, max_width: u32, max_lines: usize) -> Vec<String> {
        let fits = |s: &str| self.width(s) <= max_width;
        let mut lines: Vec<String> = Vec::new();
        let mut cur = String::new();
        for word in text.split_whitespace() {
            let joined = if cur.is_empty() {
                word.to_string()
            } else {
                format!("{cur} {word}")
            };
            if fits(&joined) {
                cur = joined;
                continue;
            }
            if !cur.is_empty() {
                lines.push(std::mem::take(&mut cur));
            }
            // The word alone, split where it does not fit (at least one character per line).
            for c in word.chars() {
                let mut next = cur.clone();
                next.push(c);
                if !cur.is_empty() && !fits(&next) {
                    lines.push(std::mem::take(&mut cur));
                    next = c.to_string();
                }
                cur = next;
            }
        }
        if !cur.is_empty() {
            lines.push(cur);
        }
        if max_lines > 0 && lines.len() > max_lines {
            lines.truncate(max_lines);
            let last = lines.last_mut().expect("max_lines > 0");
            while !last.is_empty() && !fits(&format!("{last}…")) {
                last.pop();
            }
            let trimmed = last.trim_end().to_string();
            *last = format!("{trimmed}…");
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ink(img: &image::RgbImage) -> Vec<(u32, u32)> {
        img.enumerate_pixels()
            .filter(|(_, _, p)| p[0] < 255)
            .map(|(x, y, _)| (x, y))
            .collect()
    }

    /// Text lands inside its measured box: left of `width`, within one line height.
    #[test]
    fn draws_inside_the_measured_box() {
        let style = TextStyle::new(16.0);
        let text = "A dog, on the grass (Émile's)";
        let (w, h) = (style.width(text) + 20, style.line_height() + 20);
        let mut img = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
        let end = style.draw(&mut img, 10, 10, text, image::Rgb([0, 0, 0]));
        assert_eq!(end, 10 + i64::from(style.width(text)));
        let pts = ink(&img);
        assert!(pts.len() > 200, "{} inked pixels", pts.len());
        for (x, y) in pts {
            assert!((9..=10 + style.width(text) + 1).contains(&x), "x {x}");
            assert!((10..10 + style.line_height()).contains(&y), "y {y}");
        }
        // Anti-aliased: some pixels are neither background nor full ink.
        assert!(img.pixels().any(|p| p[0] > 0 && p[0] < 255));
    }

    /// Proportional widths; a space draws nothing; characters beyond ASCII have their own glyphs.
    #[test]
    fn widths_and_glyphs() {
        let style = TextStyle::new(12.0);
        assert!(style.width("WWW") > style.width("iii"));
        assert_eq!(style.width(""), 0);
        assert!(style.width("ab") > style.width("a"));
        let render = |t: &str| {
            let mut img = image::RgbImage::from_pixel(40, 20, image::Rgb([255, 255, 255]));
            style.draw(&mut img, 2, 2, t, image::Rgb([0, 0, 0]));
            img
        };
        assert!(ink(&render(" ")).is_empty());
        assert_ne!(render("é"), render("e"));
        assert_ne!(render("é"), render("?"));
        // Drawing partly outside the image on every side is fine.
        let mut small = image::RgbImage::from_pixel(6, 6, image::Rgb([255, 255, 255]));
        style.draw(&mut small, -4, -5, "MW", image::Rgb([0, 0, 0]));
        assert!(!ink(&small).is_empty());
    }

    #[test]
    fn wrap_fits_the_width_and_cuts_with_an_ellipsis() {
        let style = TextStyle::new(12.0);
        let text = "a photo of a  dog\non the beach at sunset with a red ball";
        let width = style.width("a photo of a dog");
        let lines = style.wrap(text, width, 0);
        assert!(lines.len() > 2, "{lines:?}");
        for l in &lines {
            assert!(style.width(l) <= width, "{l:?}");
        }
        assert_eq!(
            lines.join(" "),
            text.split_whitespace().collect::<Vec<_>>().join(" ")
        );
        let cut = style.wrap(text, width, 2);
        assert_eq!(cut.len(), 2);
        assert!(cut[1].ends_with('…'), "{cut:?}");
        assert!(style.width(&cut[1]) <= width);
        // A word wider than the line is split between characters.
        let long = style.wrap("abcdefghijklmnopqrstuvwxyz", style.width("abcdefgh"), 0);
        assert!(long.len() >= 3, "{long:?}");
        assert_eq!(long.concat(), "abcdefghijklmnopqrstuvwxyz");
        assert!(style.wrap("   ", 50, 3).is_empty());
    }
}
