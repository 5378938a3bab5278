//! MLX affine quantization: `w = scale · q + bias` per group of `group_size` consecutive inputs,
//! `q` packed into little-endian u32 words, least significant bits first.

use crate::config::QuantParams;

use super::safetensors::{to_f32, DType};

/// Infers (bits, group_size) of a quantized `[out, in]` matrix from the shapes of its packed
/// weight (`[.., out, in·bits/32]`) and scales (`[.., out, in/group_size]`).
pub fn infer_params(
    in_features: usize,
    packed_cols: usize,
    scale_cols: usize,
) -> Option<QuantParams> {
    if in_features == 0
        || scale_cols == 0
        || (packed_cols * 32) % in_features != 0
        || in_features % scale_cols != 0
    {
        return None;
    }
    let bits = packed_cols * 32 / in_features;
    matches!(bits, 2 | 4 | 8).then_some(QuantParams {
        bits,
        group_size: in_features / scale_cols,
    })
}

/// Dequantizes `rows × in_features` values, appending them to `out` (f32), given the raw packed
/// words, scales and biases bytes of exactly those rows.
pub fn dequantize_into(
    packed: &[u8],
    scales: &[u8],
    biases: &[u8],
    scale_dtype: DType,
    p: QuantParams,
    in_features: usize,
    out: &mut Vec<f32>,
) -> Result<(), String> {
    let scales = to_f32(scales, scale_dtype)?;
    let biases = to_f32(biases, scale_dtype)?;
    let groups = in_features / p.group_size;
    let words_per_row = in_features * p.bits / 32;
    let rows = scales.len() / groups.max(1);
    if packed.len() != rows * words_per_row * 4 || biases.len() != scales.len() || rows * groups != scales.len() {
        return Err(format!(
            "quantized sizes disagree: {} packed bytes, {} scales, {} biases for {rows} rows of {in_features} inputs at {} bits, group {}",
            packed.len(),
            scales.len(),
            biases.len(),
            p.bits,
            p.group_size
        ));
    }
    let mask = (1u32 << p.bits) - 1;
    let per_word = 32 / p.bits;
    out.reserve(rows * in_features);
    if (p.group_size * p.bits) % 32 == 0 {
        // Whole words per group (every 2/4/8-bit layout with group ≥ 16): one scale and bias per
        // run of words, no per-element division.
        let group_bytes = p.group_size * p.bits / 8;
        for (g, words) in packed.chunks_exact(group_bytes).enumerate() {
            let (sc, bi) = (scales[g], biases[g]);
            for w in words.chunks_exact(4) {
                let word = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                for j in 0..per_word {
                    out.push(sc * ((word >> (j * p.bits)) & mask) as f32 + bi);
                }
            }
        }
        return Ok(());
    }
    for r in 0..rows {
        let row = &packed[r * words_per_row * 4..(r + 1) * words_per_row * 4];
        for (wi, w) in row.chunks_exact(4).enumerate() {
            let word = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            for j in 0..per_word {
                let i = wi * per_word + j;
                let g = r * groups + i / p.group_size;
                out.push(scales[g] * ((word >> (j * p.bits)) & mask) as f32 + biases[g]);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dequantizes_lsb_first_per_group() {
        // One row of 16 inputs at 4 bits, group 8: two words, two groups.
        let qs: Vec<u32> = (0..16).map(|i| (i % 16) as u32).collect();
        let mut words = [0u32; 2];
        for (i, q) in qs.iter().enumerate() {
            words[i / 8] |= q << ((i % 8) * 4);
        }
        let packed: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let scales: Vec<u8> = [0.5f32, 2.0].iter().flat_map(|s| s.to_le_bytes()).collect();
        let biases: Vec<u8> = [1.0f32, -1.0]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        let mut out = Vec::new();
        let p = QuantParams {
            bits: 4,
            group_size: 8,
        };
        dequantize_into(&packed, &scales, &biases, DType::F32, p, 16, &mut out).unwrap();
        let want: Vec<f32> = (0..16)
            .map(|i| {
                if i < 8 {
                    0.5 * i as f32 + 1.0
                } else {
                    2.0 * i as f32 - 1.0
                }
            })
            .collect();
        assert_eq!(out, want);
        assert_eq!(infer_params(16, 2, 2), Some(p));
        assert_eq!(
            infer_params(64, 4, 1),
            Some(QuantParams {
                bits: 2,
                group_size: 64
            })
        );
    }
}
