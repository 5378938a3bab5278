//! A prompt's input rows quantized once for the int8 kernels by the blocks of a parallel
//! region together ([`QuantizedRows`]).

use super::kernels::{current_kernels, q4, Kernels};

/// A prompt's input rows quantized once for the int8 kernels of the current context's kind,
/// for every block of a parallel region's product(s) to share ([`super::packed::PackedMatrix::matmul_range_q`]),
/// by those blocks together: the first to need them makes room
/// ([`q4::QuantizedInput::unfilled`]), then each block that needs them claims rows, one at a
/// time, until none is left, and waits (spinning) for the rows the others claimed. Made by one
/// block, a 16-token prompt's 1024-wide rows took 11 µs (the VM) while every other thread of
/// the product waited. A row's values depend on that row alone: the same bits as
/// [`q4::QuantizedInput::new`] (unit test).
#[derive(Default)]
pub struct QuantizedRows {
    room: super::kernels::spin::SpinOnce<Option<Room>>,
    /// The next row to claim.
    next: std::sync::atomic::AtomicUsize,
    /// Rows quantized.
    done: std::sync::atomic::AtomicUsize,
    /// A claimed row was not quantized (its thread panicked): the waiters panic too.
    failed: std::sync::atomic::AtomicBool,
}

/// [`QuantizedRows`]' input, filled row by row through pointers to its parts.
struct Room {
    qi: std::cell::UnsafeCell<q4::QuantizedInput>,
    parts: (*mut i8, *mut i8, *mut f32, *mut f32),
    two: bool,
}

// SAFETY: the parts are written only through `parts`, each row by the one thread that claimed
// it, and read only after every row is done (`QuantizedRows::get`).
unsafe impl Send for Room {}
// SAFETY: as above.
unsafe impl Sync for Room {}

impl QuantizedRows {
    /// The rows `xs` (`cols` each) quantized for the int8 kernels of the current context's
    /// kind; `None` with the exact kernels (nothing to quantize) or rows the int8 kernels do
    /// not take. Every caller of one `QuantizedRows` passes the same `xs`.
    pub fn get(&self, xs: &[f32], cols: usize) -> Option<&q4::QuantizedInput> {
        use std::sync::atomic::Ordering;
        let room = self
            .room
            .get_or_init(|| {
                let kind = current_kernels();
                let fits = cols > 0 && cols.is_multiple_of(64) && xs.len().is_multiple_of(cols);
                (kind != Kernels::Exact && fits).then(|| {
                    let two = kind == Kernels::Int8x2;
                    let mut qi = q4::QuantizedInput::unfilled(xs.len(), cols, two);
                    let parts = (
                        qi.q.as_mut_ptr(),
                        qi.q2.as_mut_ptr(),
                        qi.d.as_mut_ptr(),
                        qi.block_sums.as_mut_ptr(),
                    );
                    Room {
                        qi: std::cell::UnsafeCell::new(qi),
                        parts,
                        two,
                    }
                })
            })
            .as_ref()?;
        /// Marks the rows failed unless forgotten after the claimed row was quantized.
        struct Failed<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Failed<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let rows = xs.len() / cols;
        let simd = q4::Simd::current();
        loop {
            let r = self.next.fetch_add(1, Ordering::Relaxed);
            if r >= rows {
                break;
            }
            let failed = Failed(&self.failed);
            let (q, q2, d, sums) = room.parts;
            // SAFETY: row `r`'s parts (`cols` values of `q` and `q2`, `cols / 8` of `d`,
            // `cols / 32` of the block sums) lie inside the room made for `rows` rows and are
            // this thread's alone: it claimed `r`, and no one reads them before `done` counts
            // every row.
            let parts = unsafe {
                let (q2, n2) = if room.two {
                    (q2.add(r * cols), cols)
                } else {
                    (q2, 0)
                };
                q4::Parts {
                    q: std::slice::from_raw_parts_mut(q.add(r * cols), cols),
                    q2: std::slice::from_raw_parts_mut(q2, n2),
                    d: std::slice::from_raw_parts_mut(d.add(r * cols / 8), cols / 8),
                    block_sums: std::slice::from_raw_parts_mut(sums.add(r * cols / 32), cols / 32),
                }
            };
            q4::quantize_into(simd, &xs[r * cols..(r + 1) * cols], room.two, parts);
            std::mem::forget(failed);
            self.done.fetch_add(1, Ordering::Release);
        }
        while self.done.load(Ordering::Acquire) < rows {
            assert!(
                !self.failed.load(Ordering::Acquire),
                "the thread quantizing a shared input row panicked"
            );
            std::hint::spin_loop();
        }
        // SAFETY: every row is done (acquire: their writes are visible) and none is written
        // again.
        Some(unsafe { &*room.qi.get() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::kernels::{par_for, with, Context};

    /// Blocks of a region racing for one input's rows get one input, bit for bit
    /// `QuantizedInput::new`'s, for one part and two; the exact kernels get none.
    #[test]
    fn rows_quantized_together_are_the_whole_inputs_bits() {
        let cols = 128;
        let xs: Vec<f32> = (0..9 * cols)
            .map(|i| ((i * 2654435761) % 1999) as f32 / 997.0 - 1.0)
            .collect();
        for (kind, two) in [(Kernels::Int8x2, true), (Kernels::Int8, false)] {
            let want = q4::QuantizedInput::new(&xs, cols, two);
            for _ in 0..20 {
                let ctx = Context::new(kind, Some(4)).unwrap();
                let rows = QuantizedRows::default();
                let seen = std::sync::Mutex::new(Vec::new());
                with(&ctx, || {
                    par_for(12, &|_| {
                        let q = rows.get(&xs, cols).expect("an int8 kind quantizes");
                        seen.lock()
                            .unwrap()
                            .push(q as *const q4::QuantizedInput as usize);
                    })
                });
                let seen = seen.into_inner().unwrap();
                assert!(seen.iter().all(|&p| p == seen[0]), "{kind}: one input");
                let got = rows.get(&xs, cols).unwrap();
                assert_eq!((&got.q, &got.q2, got.cols), (&want.q, &want.q2, want.cols));
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got.d), bits(&want.d), "{kind}");
                assert_eq!(bits(&got.block_sums), bits(&want.block_sums), "{kind}");
            }
        }
        let ctx = Context::new(Kernels::Exact, Some(2)).unwrap();
        assert!(with(&ctx, || QuantizedRows::default()
            .get(&xs, cols)
            .is_none()));
    }
}
