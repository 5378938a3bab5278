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
        || !(packed_cols * 32).is_multiple_of(in_features)
        || !in_features.is_multiple_of(scale_cols)
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
    if packed.len() != rows * words_per_row * 4
        || biases.len() != scales.len()
        || rows * groups != scales.len()
    {
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
    if (p.group_size * p.bits).is_multiple_of(32) {
        // Whole words per group (every 2/4/8-bit layout with group ≥ 16): one scale and bias per
        // run of words, no per-element division. Large matrices are split across cores.
        let group_bytes = p.group_size * p.bits / 8;
        let n_groups = scales.len();
        let start = out.len();
        out.resize(start + n_groups * p.group_size, 0.0);
        let dst = &mut out[start..];
        let decode = |g0: usize, dst: &mut [f32]| {
            for (k, chunk) in dst.chunks_exact_mut(p.group_size).enumerate() {
                let g = g0 + k;
                let (sc, bi) = (scales[g], biases[g]);
                let words = &packed[g * group_bytes..(g + 1) * group_bytes];
                for (w, vals) in words.chunks_exact(4).zip(chunk.chunks_exact_mut(per_word)) {
                    let word = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                    for (j, v) in vals.iter_mut().enumerate() {
                        *v = sc * ((word >> (j * p.bits)) & mask) as f32 + bi;
                    }
                }
            }
        };
        let block = n_groups.div_ceil(4 * super::kernels::cores()).max(1) * p.group_size;
        super::kernels::by_blocks(dst, block, dst.len(), |start, part| {
            decode(start / p.group_size, part)
        });
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

/// Dequantizes MLX affine-quantized data held as tensors on any device (CPU, CUDA, Metal) with
/// element-wise ops only, so the packed bytes can cross the host→device link and be decoded
/// there: `packed` is the raw little-endian bytes `[rows, cols·bits/8]` as u8, `scales` and
/// `biases` are `[rows, cols/group_size]` in any float type. Returns f32 `[rows, cols]`, computed
/// as `scale · q + bias` like [`dequantize_into`].
///
/// Every step is exact in f32: a byte is below 2^8, and splitting it into `8/bits` fields uses
/// multiplication by powers of two and `floor`.
pub fn dequantize_tensor(
    packed: &candle_core::Tensor,
    scales: &candle_core::Tensor,
    biases: &candle_core::Tensor,
    p: QuantParams,
    rows: usize,
    cols: usize,
) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::{DType as T, Tensor};
    let x = packed.to_dtype(T::F32)?;
    let per_byte = 8 / p.bits;
    let q = if per_byte == 1 {
        x
    } else {
        // Field k of a byte holds element `per_byte·byte + k` (least significant bits first).
        let base = (1u32 << p.bits) as f64;
        let mut fields = Vec::with_capacity(per_byte);
        let mut rest = x;
        for _ in 1..per_byte {
            let high = (&rest * (1.0 / base))?.floor()?;
            fields.push((&rest - (&high * base)?)?);
            rest = high;
        }
        fields.push(rest);
        Tensor::stack(&fields, 2)?
    };
    let g = cols / p.group_size;
    let s = scales.to_dtype(T::F32)?.reshape((rows, g, 1))?;
    let b = biases.to_dtype(T::F32)?.reshape((rows, g, 1))?;
    q.reshape((rows, g, p.group_size))?
        .broadcast_mul(&s)?
        .broadcast_add(&b)?
        .reshape((rows, cols))
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

    #[test]
    fn threaded_decode_equals_the_elementwise_formula() {
        // 1024 × 2048 at 4 bits: above the threading threshold.
        let (rows, cols, p) = (
            1024usize,
            2048usize,
            QuantParams {
                bits: 4,
                group_size: 64,
            },
        );
        let mut x = 0x1234_5678u32;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let words: Vec<u32> = (0..rows * cols / 8).map(|_| rnd()).collect();
        let packed: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let groups = rows * cols / 64;
        let sc: Vec<f32> = (0..groups).map(|g| 0.01 + (g % 7) as f32 * 0.001).collect();
        let bi: Vec<f32> = (0..groups).map(|g| -0.05 + (g % 5) as f32 * 0.01).collect();
        let bytes = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
        let mut out = vec![42.0];
        dequantize_into(
            &packed,
            &bytes(&sc),
            &bytes(&bi),
            DType::F32,
            p,
            cols,
            &mut out,
        )
        .unwrap();
        assert_eq!(out.len(), 1 + rows * cols, "appends after existing values");
        for i in (0..rows * cols).step_by(9973) {
            let q = (words[i / 8] >> ((i % 8) * 4)) & 15;
            assert_eq!(
                out[1 + i],
                sc[i / 64] * q as f32 + bi[i / 64],
                "element {i}"
            );
        }
    }

    #[test]
    fn device_tensor_decode_equals_the_host_decode() {
        // The element-wise device path must give the host decoder's values for every width.
        let mut x = 0x9e37_79b9u32;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for bits in [2usize, 4, 8] {
            let (rows, cols, p) = (
                6usize,
                256usize,
                QuantParams {
                    bits,
                    group_size: 32,
                },
            );
            let packed: Vec<u8> = (0..rows * cols * bits / 8).map(|_| rnd() as u8).collect();
            let g = rows * cols / 32;
            let half = |v: f32| half::bf16::from_f32(v).to_le_bytes();
            let scales: Vec<u8> = (0..g)
                .flat_map(|_| half((rnd() % 1000) as f32 / 997.0 - 0.5))
                .collect();
            let biases: Vec<u8> = (0..g)
                .flat_map(|_| half((rnd() % 1000) as f32 / 113.0 - 4.0))
                .collect();
            let mut want = Vec::new();
            dequantize_into(&packed, &scales, &biases, DType::BF16, p, cols, &mut want).unwrap();
            let dev = candle_core::Device::Cpu;
            let t = |b: &[u8], dt, shape: (usize, usize)| {
                candle_core::Tensor::from_raw_buffer(b, dt, &[shape.0, shape.1], &dev).unwrap()
            };
            let got = dequantize_tensor(
                &t(&packed, candle_core::DType::U8, (rows, cols * bits / 8)),
                &t(&scales, candle_core::DType::BF16, (rows, cols / 32)),
                &t(&biases, candle_core::DType::BF16, (rows, cols / 32)),
                p,
                rows,
                cols,
            )
            .unwrap();
            let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got, want, "{bits}-bit");
        }
    }
}
