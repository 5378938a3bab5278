//! The tensors `harness synth` writes for a model: names, dtypes, shapes and fills, per family
//! and layout (MLX stacked or HF per-expert), including the hybrid families' linear-attention
//! tensors.

use crate::config::{DeltaNetSpec, Family, LayerKind, LinearKind, ModelSpec, RouterSpec};

use super::SynthLayout;

pub(super) const GROUP: usize = 64;

/// One tensor to write: name, dtype tag, shape, and how to fill it.
pub(super) struct Planned {
    pub(super) name: String,
    pub(super) dtype: &'static str,
    pub(super) shape: Vec<usize>,
    pub(super) fill: Fill,
}

#[derive(Clone, Copy)]
pub(super) enum Fill {
    /// bf16 uniform noise with this standard deviation.
    Random(f32),
    /// bf16 constant.
    Const(f32),
    /// f32 constant.
    ConstF32(f32),
    /// Random packed quantized words.
    Words,
}

impl Planned {
    pub(super) fn bytes(&self) -> u64 {
        let n: usize = self.shape.iter().product();
        (n * if self.dtype == "BF16" { 2 } else { 4 }) as u64
    }
}

pub(super) struct Plan {
    layout: SynthLayout,
    pub(super) tensors: Vec<Planned>,
}

impl Plan {
    fn vector(&mut self, name: String, n: usize, fill: Fill) {
        self.tensors.push(Planned {
            name,
            dtype: "BF16",
            shape: vec![n],
            fill,
        });
    }
    /// A matrix `[lead.., rows, cols]`, quantized along `cols` in MLX layouts when it divides.
    fn matrix(&mut self, module: &str, lead: &[usize], rows: usize, cols: usize, quantize: bool) {
        let scale = (cols as f32).powf(-0.5);
        let mut shape = lead.to_vec();
        match self.layout {
            SynthLayout::Mlx(bits) if quantize && cols.is_multiple_of(GROUP) => {
                let mut w = shape.clone();
                w.extend([rows, cols * bits / 32]);
                let mut s = shape.clone();
                s.extend([rows, cols / GROUP]);
                self.tensors.push(Planned {
                    name: format!("{module}.weight"),
                    dtype: "U32",
                    shape: w,
                    fill: Fill::Words,
                });
                // w = scale·q + bias with q uniform in 0..2^bits: centre it and give it std ≈ scale.
                let levels = ((1usize << bits) - 1) as f32;
                let step = scale * 3.46 / levels;
                self.tensors.push(Planned {
                    name: format!("{module}.scales"),
                    dtype: "BF16",
                    shape: s.clone(),
                    fill: Fill::Const(step),
                });
                self.tensors.push(Planned {
                    name: format!("{module}.biases"),
                    dtype: "BF16",
                    shape: s,
                    fill: Fill::Const(-step * levels / 2.0),
                });
            }
            _ => {
                shape.extend([rows, cols]);
                self.tensors.push(Planned {
                    name: format!("{module}.weight"),
                    dtype: "BF16",
                    shape,
                    fill: Fill::Random(scale),
                });
            }
        }
    }
}

impl Plan {
    /// Kimi Delta Attention's tensors under `at` (`…self_attn`), in HF's or mlx-lm's spelling.
    fn kda(&mut self, at: &str, h: usize, d: &DeltaNetSpec) {
        let (nh, hd, k) = (d.num_k_heads, d.k_head_dim, d.conv_kernel);
        let c = nh * hd;
        for p in ["q", "k", "v"] {
            self.matrix(&format!("{at}.{p}_proj"), &[], c, h, true);
            let (name, shape) = match self.layout {
                SynthLayout::Mlx(_) => (format!("{at}.{p}_conv.conv.weight"), vec![c, k, 1]),
                SynthLayout::Bf16 => (format!("{at}.{p}_conv1d.weight"), vec![c, 1, k]),
            };
            self.tensors.push(Planned {
                name,
                dtype: "BF16",
                shape,
                fill: Fill::Random((k as f32).powf(-0.5)),
            });
        }
        self.matrix(&format!("{at}.f_a_proj"), &[], hd, h, true);
        self.matrix(&format!("{at}.f_b_proj"), &[], c, hd, true);
        self.matrix(&format!("{at}.g_a_proj"), &[], hd, h, true);
        self.matrix(&format!("{at}.g_b_proj"), &[], c, hd, true);
        self.matrix(&format!("{at}.b_proj"), &[], nh, h, true);
        self.matrix(&format!("{at}.o_proj"), &[], h, c, true);
        self.tensors.push(Planned {
            name: format!("{at}.A_log"),
            dtype: "F32",
            shape: vec![1, 1, nh, 1],
            fill: Fill::ConstF32(0.0),
        });
        self.tensors.push(Planned {
            name: format!("{at}.dt_bias"),
            dtype: "F32",
            shape: vec![c],
            fill: Fill::ConstF32(1.0),
        });
        self.vector(format!("{at}.o_norm.weight"), hd, Fill::Const(1.0));
    }
}

pub(super) fn plan(spec: &ModelSpec, layout: SynthLayout) -> Plan {
    let mut p = Plan {
        layout,
        tensors: Vec::new(),
    };
    let (h, v) = (spec.hidden_size, spec.vocab_size);
    // Qwen3-Next's HF norms are zero-centred (scale 1 + weight); mlx-lm stores them shifted.
    let norm_one = match (spec.family, layout) {
        (Family::Qwen3Next, SynthLayout::Bf16) => Fill::Const(0.0),
        _ => Fill::Const(1.0),
    };
    p.matrix("model.embed_tokens", &[], v, h, true);
    p.vector("model.norm.weight".into(), h, norm_one);
    if !spec.tie_word_embeddings {
        p.matrix("lm_head", &[], v, h, true);
    }
    let a = &spec.attention;
    for i in 0..spec.num_layers {
        let l = format!("model.layers.{i}");
        p.vector(format!("{l}.input_layernorm.weight"), h, norm_one);
        p.vector(format!("{l}.post_attention_layernorm.weight"), h, norm_one);
        let at = format!("{l}.self_attn");
        let kind = spec
            .hybrid
            .as_ref()
            .map(|hy| (hy.layer_types[i], &hy.delta));
        let kda = spec.hybrid.as_ref().map(|hy| hy.linear) == Some(LinearKind::Kda);
        if let (Some((LayerKind::LinearAttention, d)), true) = (kind, kda) {
            p.kda(&at, h, d);
        } else if let Some((LayerKind::LinearAttention, d)) = kind {
            let la = format!("{l}.linear_attn");
            let (kd, vd, nv) = (d.key_dim(), d.value_dim(), d.num_v_heads);
            p.matrix(&format!("{la}.in_proj_qkvz"), &[], 2 * kd + 2 * vd, h, true);
            p.matrix(&format!("{la}.in_proj_ba"), &[], 2 * nv, h, true);
            p.matrix(&format!("{la}.out_proj"), &[], h, vd, true);
            let k = d.conv_kernel;
            p.tensors.push(Planned {
                name: format!("{la}.conv1d.weight"),
                dtype: "BF16",
                shape: match layout {
                    SynthLayout::Mlx(_) => vec![d.conv_dim(), k, 1],
                    SynthLayout::Bf16 => vec![d.conv_dim(), 1, k],
                },
                fill: Fill::Random((k as f32).powf(-0.5)),
            });
            p.vector(format!("{la}.dt_bias"), nv, Fill::Const(1.0));
            p.vector(format!("{la}.A_log"), nv, Fill::Const(0.0));
            p.vector(format!("{la}.norm.weight"), d.v_head_dim, Fill::Const(1.0));
        }
        let gated =
            spec.family == Family::Qwen3Next && matches!(kind, Some((LayerKind::FullAttention, _)));
        match &spec.mla {
            _ if matches!(kind, Some((LayerKind::LinearAttention, _))) => {}
            Some(m) => {
                let dq = m.qk_nope_head_dim + m.qk_rope_head_dim;
                let heads = a.num_heads;
                match m.q_lora_rank {
                    Some(r) => {
                        p.matrix(&format!("{at}.q_a_proj"), &[], r, h, true);
                        p.vector(format!("{at}.q_a_layernorm.weight"), r, Fill::Const(1.0));
                        p.matrix(&format!("{at}.q_b_proj"), &[], heads * dq, r, true);
                    }
                    None => p.matrix(&format!("{at}.q_proj"), &[], heads * dq, h, true),
                }
                p.matrix(
                    &format!("{at}.kv_a_proj_with_mqa"),
                    &[],
                    m.kv_lora_rank + m.qk_rope_head_dim,
                    h,
                    true,
                );
                p.vector(
                    format!("{at}.kv_a_layernorm.weight"),
                    m.kv_lora_rank,
                    Fill::Const(1.0),
                );
                if let SynthLayout::Mlx(_) = layout {
                    p.matrix(
                        &format!("{at}.embed_q"),
                        &[heads],
                        m.kv_lora_rank,
                        m.qk_nope_head_dim,
                        true,
                    );
                    p.matrix(
                        &format!("{at}.unembed_out"),
                        &[heads],
                        m.v_head_dim,
                        m.kv_lora_rank,
                        true,
                    );
                } else {
                    p.matrix(
                        &format!("{at}.kv_b_proj"),
                        &[],
                        heads * (m.qk_nope_head_dim + m.v_head_dim),
                        m.kv_lora_rank,
                        true,
                    );
                }
                p.matrix(&format!("{at}.o_proj"), &[], h, heads * m.v_head_dim, true);
            }
            None => {
                let (nh, nkv, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
                let q_rows = if gated { 2 * nh * hd } else { nh * hd };
                for (n, o, bias) in [
                    ("q_proj", q_rows, a.qkv_bias),
                    ("k_proj", nkv * hd, a.qkv_bias),
                    ("v_proj", nkv * hd, a.qkv_bias),
                ] {
                    p.matrix(&format!("{at}.{n}"), &[], o, h, true);
                    if bias {
                        p.vector(format!("{at}.{n}.bias"), o, Fill::Random(0.02));
                    }
                }
                p.matrix(&format!("{at}.o_proj"), &[], h, nh * hd, true);
                if a.o_bias {
                    p.vector(format!("{at}.o_proj.bias"), h, Fill::Random(0.02));
                }
                if a.qk_norm {
                    p.vector(format!("{at}.q_norm.weight"), hd, norm_one);
                    p.vector(format!("{at}.k_norm.weight"), hd, norm_one);
                }
            }
        }
        if !spec.is_moe_layer(i) {
            let di = spec.dense_intermediate;
            p.matrix(&format!("{l}.mlp.gate_proj"), &[], di, h, true);
            p.matrix(&format!("{l}.mlp.up_proj"), &[], di, h, true);
            p.matrix(&format!("{l}.mlp.down_proj"), &[], h, di, true);
            continue;
        }
        let module = match layout {
            SynthLayout::Mlx(_) => spec.keys.stacked_mlp,
            SynthLayout::Bf16 => spec.keys.mlp,
        };
        let mlp = format!("{l}.{module}");
        let (e, mi) = (spec.moe.num_experts, spec.moe.intermediate_size);
        // Routers stay unquantized, as mlx-lm leaves the sigmoid routers.
        p.matrix(&format!("{mlp}.gate"), &[], e, h, false);
        if matches!(spec.moe.router, RouterSpec::SigmoidNoauxTc { .. }) {
            // mlx-lm keeps Kimi-Linear's bias beside the gate, not under it.
            let bias = match (spec.family, layout) {
                (Family::KimiLinear, SynthLayout::Mlx(_)) => "e_score_correction_bias",
                _ => "gate.e_score_correction_bias",
            };
            p.tensors.push(Planned {
                name: format!("{mlp}.{bias}"),
                dtype: "F32",
                shape: vec![e],
                fill: Fill::ConstF32(0.0),
            });
        }
        if let (Some(name), Some(si)) = (spec.keys.shared, spec.moe.shared_intermediate) {
            p.matrix(&format!("{mlp}.{name}.gate_proj"), &[], si, h, true);
            p.matrix(&format!("{mlp}.{name}.up_proj"), &[], si, h, true);
            p.matrix(&format!("{mlp}.{name}.down_proj"), &[], h, si, true);
            if spec.family == Family::Qwen3Next {
                p.matrix(&format!("{mlp}.shared_expert_gate"), &[], 1, h, false);
            }
        }
        match layout {
            SynthLayout::Mlx(_) => {
                p.matrix(&format!("{mlp}.switch_mlp.gate_proj"), &[e], mi, h, true);
                p.matrix(&format!("{mlp}.switch_mlp.up_proj"), &[e], mi, h, true);
                p.matrix(&format!("{mlp}.switch_mlp.down_proj"), &[e], h, mi, true);
            }
            SynthLayout::Bf16 => {
                let [g, u, d] = spec.keys.expert_proj;
                for x in 0..e {
                    p.matrix(&format!("{mlp}.experts.{x}.{g}"), &[], mi, h, true);
                    p.matrix(&format!("{mlp}.experts.{x}.{u}"), &[], mi, h, true);
                    p.matrix(&format!("{mlp}.experts.{x}.{d}"), &[], h, mi, true);
                }
            }
        }
    }
    p
}
