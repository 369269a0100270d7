//! NumPy `.npy` files of float32 arrays (format versions 1–3, little-endian, C or Fortran order):
//! how latents, subject embeddings and images are exchanged with diffusers and LAVIS.

use std::io::Write;
use std::path::Path;

use crate::error::DataError;

/// A float32 array in C (row-major) order.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyF32 {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

fn bad(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::Npy {
        path: path.to_path_buf(),
        reason: format!("not a float .npy array: {}", reason.into()),
    }
}

/// Reads a float32 `.npy` file; float64 and float16 are converted. Fortran-ordered arrays are
/// returned in C order.
pub fn read_f32(path: &Path) -> Result<NpyF32, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    parse_f32(&bytes).map_err(|r| bad(path, r))
}

fn parse_f32(bytes: &[u8]) -> Result<NpyF32, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("no NumPy magic".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("format version {v}")),
    };
    let header = bytes
        .get(start..start + header_len)
        .ok_or("header runs past the end of the file")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let descr = dict_value(header, "descr").ok_or("no 'descr' in the header")?;
    let fortran = dict_value(header, "fortran_order").ok_or("no 'fortran_order'")?;
    let shape_text = dict_value(header, "shape").ok_or("no 'shape' in the header")?;
    let shape: Vec<usize> = shape_text
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| format!("shape {shape_text}")))
        .collect::<Result<_, _>>()?;
    let n: usize = shape.iter().product();
    let body = &bytes[start + header_len..];
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let width = match descr {
        "<f4" | "=f4" | "|f4" => 4,
        "<f8" | "=f8" => 8,
        "<f2" | "=f2" => 2,
        other => {
            return Err(format!(
                "dtype {other} (float16/32/64 little-endian expected)"
            ))
        }
    };
    if body.len() != n * width {
        return Err(format!(
            "shape {shape:?} needs {} bytes of data, the file has {}",
            n * width,
            body.len()
        ));
    }
    let mut data: Vec<f32> = match width {
        4 => body
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        8 => body
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        _ => body
            .chunks_exact(2)
            .map(|c| half_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
    };
    if fortran.trim() == "True" && shape.len() > 1 {
        data = fortran_to_c(&data, &shape);
    }
    Ok(NpyF32 { shape, data })
}

/// The text of `'key': value` in a Python dict literal (value up to the next top-level comma).
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = &header[at + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0;
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    None
}

fn half_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: normalise.
            let mut e = 127 - 15 + 1;
            let mut f = f;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | (e << 23) | ((f & 0x3ff) << 13)
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

fn fortran_to_c(data: &[f32], shape: &[usize]) -> Vec<f32> {
    let n = data.len();
    let d = shape.len();
    let mut out = vec![0.0; n];
    let mut idx = vec![0usize; d];
    for (c_pos, slot) in out.iter_mut().enumerate() {
        let mut rem = c_pos;
        for k in (0..d).rev() {
            idx[k] = rem % shape[k];
            rem /= shape[k];
        }
        let mut f_pos = 0;
        let mut stride = 1;
        for k in 0..d {
            f_pos += idx[k] * stride;
            stride *= shape[k];
        }
        *slot = data[f_pos];
    }
    out
}

/// Writes a float32 C-order `.npy` file (format 1.0), atomically (a temporary file renamed into place).
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<(), DataError> {
    let n: usize = shape.iter().product();
    if n != data.len() {
        return Err(bad(
            path,
            format!("shape {shape:?} holds {n} values, {} given", data.len()),
        ));
    }
    let dims = match shape {
        [one] => format!("({one},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    let pad = (64 - (10 + header.len() + 1) % 64) % 64;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + 4 * n);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let tmp = path.with_extension("npy.partial");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| DataError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_files() {
        let dir = std::env::temp_dir().join(format!("blipd-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.npy");
        let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        write_f32(&p, &[2, 3, 4], &data).unwrap();
        let back = read_f32(&p).unwrap();
        assert_eq!(back.shape, vec![2, 3, 4]);
        assert_eq!(back.data, data);
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!((bytes.len() - 24 * 4) % 64, 0, "header aligned to 64 bytes");
        // Truncated data.
        std::fs::write(&p, &bytes[..bytes.len() - 4]).unwrap();
        let e = read_f32(&p).unwrap_err().to_string();
        assert!(e.contains("needs 96 bytes"), "{e}");
        std::fs::write(&p, b"hello").unwrap();
        assert!(read_f32(&p).unwrap_err().to_string().contains("magic"));
        assert!(write_f32(&p, &[2, 2], &[1.0]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fortran_order_and_other_widths() {
        // numpy: np.asfortranarray(np.arange(6, dtype='<f8').reshape(2, 3))
        let header = "{'descr': '<f8', 'fortran_order': True, 'shape': (2, 3), }";
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        for v in [0.0f64, 3.0, 1.0, 4.0, 2.0, 5.0] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let a = parse_f32(&bytes).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(half_to_f32(0x3c00), 1.0);
        assert_eq!(half_to_f32(0xc000), -2.0);
        assert_eq!(half_to_f32(0x0001), 5.960_464_5e-8);
    }
}
