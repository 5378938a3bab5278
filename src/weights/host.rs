//! A matrix the CPU kernels multiply in its checkpoint form: MLX-packed ([`PackedMatrix`]) or
//! floats in their type ([`FloatMatrix`]).

use super::matrix::FloatMatrix;
use super::packed::PackedMatrix;

/// A matrix the CPU kernels multiply in its checkpoint form.
#[derive(Debug, Clone)]
pub enum HostMatrix {
    /// MLX affine-packed.
    Packed(PackedMatrix),
    /// Floats.
    Float(FloatMatrix),
}

impl HostMatrix {
    /// Output size.
    pub fn rows(&self) -> usize {
        match self {
            HostMatrix::Packed(m) => m.rows(),
            HostMatrix::Float(m) => m.rows(),
        }
    }

    /// Input size.
    pub fn cols(&self) -> usize {
        match self {
            HostMatrix::Packed(m) => m.cols(),
            HostMatrix::Float(m) => m.cols(),
        }
    }

    /// `W x` for every input row of `xs`: `T × rows` outputs, row-major.
    pub fn matmul_rows(&self, xs: &[f32]) -> Vec<f32> {
        match self {
            HostMatrix::Packed(m) => m.matmul_rows(xs),
            HostMatrix::Float(m) => m.matmul_rows(xs),
        }
    }

    /// [`HostMatrix::matmul_range`] with the inputs already quantized for the int8 kernels
    /// (`q`: [`super::QuantizedRows`] of `xs`; float matrices do not use it).
    pub fn matmul_range_q(
        &self,
        rows: std::ops::Range<usize>,
        xs: &[f32],
        q: Option<&super::kernels::q4::QuantizedInput>,
    ) -> Vec<f32> {
        match self {
            HostMatrix::Packed(m) => m.matmul_range_q(rows, xs, q),
            HostMatrix::Float(m) => m.matmul_range(rows, xs),
        }
    }

    /// Appends row `r` as f32 (an embedding lookup).
    pub fn row_into(&self, r: usize, out: &mut Vec<f32>) {
        match self {
            HostMatrix::Packed(m) => m.row_into(r, out),
            HostMatrix::Float(m) => m.row_into(r, out),
        }
    }

    /// `W[rows] x` for every input row of `xs`.
    pub fn matmul_range(&self, rows: std::ops::Range<usize>, xs: &[f32]) -> Vec<f32> {
        match self {
            HostMatrix::Packed(m) => m.matmul_range(rows, xs),
            HostMatrix::Float(m) => m.matmul_range(rows, xs),
        }
    }

    /// `out += Σ_r w[r − rows.start] · W[r, :]` over `rows` (a product with the transpose).
    pub fn weighted_rows(&self, rows: std::ops::Range<usize>, w: &[f32], out: &mut [f32]) {
        match self {
            HostMatrix::Packed(m) => m.weighted_rows(rows, w, out),
            HostMatrix::Float(m) => m.weighted_rows(rows, w, out),
        }
    }

    /// Bytes held in this process's heap (0 when read in place).
    pub fn owned_bytes(&self) -> usize {
        match self {
            HostMatrix::Packed(m) => m.owned_bytes(),
            HostMatrix::Float(m) => m.owned_bytes(),
        }
    }
}
