//! NumPy `.npy` arrays of integers or floats (C order, little-endian), as vLLM and MoE-Infinity
//! save routing, from a file, from bytes (vLLM's base64 field) or from a stored `.npz` member.

use std::path::Path;

use crate::error::{Error, Result};

/// A decoded array: its shape and its values as f64 (every integer routing value and every
/// activation count is exact in f64).
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Values in C order.
    pub values: Vec<f64>,
    /// The dtype as written (`<i2`, `|u1`, `<f8`, …).
    pub descr: String,
}

fn header_field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))?;
    let rest = &header[at + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    Some(rest)
}

/// Parses `.npy` bytes; `what` names the source in errors.
pub fn parse(what: &Path, bytes: &[u8]) -> Result<Array> {
    let bad = |m: String| Error::format(what, format!("not a valid .npy array: {m}"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("no NumPy magic string".into()));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(format!("unsupported format version {v}"))),
    };
    let header = bytes
        .get(start..start + hlen)
        .ok_or_else(|| bad("truncated header".into()))?;
    let header = String::from_utf8_lossy(header);
    let descr = header_field(&header, "descr")
        .and_then(|r| r.strip_prefix('\''))
        .and_then(|r| r.split('\'').next())
        .ok_or_else(|| bad(format!("no dtype in header {header:?}")))?
        .to_string();
    if header_field(&header, "fortran_order").is_some_and(|r| r.starts_with("True")) {
        return Err(bad(
            "Fortran-ordered arrays are not supported (save with np.ascontiguousarray)".into(),
        ));
    }
    let shape_text = header_field(&header, "shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .ok_or_else(|| bad(format!("no shape in header {header:?}")))?;
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| bad(format!("bad shape ({shape_text})")))
        })
        .collect::<Result<_>>()?;
    let count: usize = shape.iter().product();
    let data = &bytes[start + hlen..];
    let big = descr.starts_with('>');
    let kind = descr.trim_start_matches(['<', '>', '|', '=']);
    let width: usize = match kind {
        "u1" | "i1" | "b1" => 1,
        "u2" | "i2" | "f2" => 2,
        "u4" | "i4" | "f4" => 4,
        "u8" | "i8" | "f8" => 8,
        _ => return Err(bad(format!("unsupported dtype {descr}"))),
    };
    if big && width > 1 {
        return Err(bad(format!("big-endian dtype {descr} is not supported")));
    }
    if data.len() < count * width {
        return Err(bad(format!(
            "truncated data: shape {shape:?} of {descr} needs {} bytes, {} present",
            count * width,
            data.len()
        )));
    }
    let values = data[..count * width]
        .chunks_exact(width)
        .map(|c| {
            let mut b = [0u8; 8];
            b[..width].copy_from_slice(c);
            match kind {
                "u1" | "b1" => c[0] as f64,
                "i1" => c[0] as i8 as f64,
                "u2" => u16::from_le_bytes([c[0], c[1]]) as f64,
                "i2" => i16::from_le_bytes([c[0], c[1]]) as f64,
                "f2" => half::f16::from_le_bytes([c[0], c[1]]).to_f64(),
                "u4" => u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64,
                "i4" => i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64,
                "f4" => f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64,
                "u8" => u64::from_le_bytes(b) as f64,
                "i8" => i64::from_le_bytes(b) as f64,
                _ => f64::from_le_bytes(b),
            }
        })
        .collect();
    Ok(Array {
        shape,
        values,
        descr,
    })
}

/// Reads a `.npy` file.
pub fn read(path: &Path) -> Result<Array> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse(path, &bytes)
}

/// Reads the members of a `.npz` archive (as `np.savez` writes them, uncompressed), by name
/// without the `.npy` suffix.
pub fn read_npz(path: &Path) -> Result<Vec<(String, Array)>> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(f))
        .map_err(|e| Error::format(path, format!("not a valid .npz (zip) archive: {e}")))?;
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let mut m = zip.by_index(i).map_err(|e| {
            Error::format(
                path,
                format!("member {i}: {e} (np.savez_compressed archives are not supported: save with np.savez)"),
            )
        })?;
        let name = m
            .name()
            .map_err(|e| Error::format(path, format!("member {i}: {e}")))?
            .trim_end_matches(".npy")
            .to_string();
        let mut bytes = Vec::new();
        m.read_to_end(&mut bytes)
            .map_err(|e| Error::format(path, format!("member {name}: {e}")))?;
        out.push((name.clone(), parse(&path.join(&name), &bytes)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({shape}), }}");
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn parses_integer_and_float_arrays_and_refuses_bad_ones() {
        let p = Path::new("x.npy");
        let a = parse(p, &npy("<i2", "2, 1, 2", &[1, 0, 2, 0, 255, 255, 7, 0])).unwrap();
        assert_eq!(a.shape, vec![2, 1, 2]);
        assert_eq!(a.values, vec![1.0, 2.0, -1.0, 7.0]);
        assert_eq!(a.descr, "<i2");
        let a = parse(p, &npy("<u2", "2,", &[0x00, 0x01, 0xff, 0xff])).unwrap();
        assert_eq!(a.values, vec![256.0, 65535.0]);
        let a = parse(p, &npy("<f8", "1,", &2.5f64.to_le_bytes())).unwrap();
        assert_eq!(a.values, vec![2.5]);
        let e = parse(p, &npy("<i4", "3,", &[0; 8]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated") && e.contains("x.npy"), "{e}");
        let e = parse(p, b"PK\x03\x04 not npy").unwrap_err().to_string();
        assert!(e.contains("magic"), "{e}");
        let e = parse(p, &npy("<c16", "1,", &[0; 16]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unsupported dtype"), "{e}");
    }
}
