//! A [`Program`] is the model written once as an ordered list of ops on virtual tensors
//! (DESIGN.md, "Program and memory plan"). The model appends ops for one shape key (batch of
//! windows, number of sparse tokens, text length); [`planner`] turns tensor lifetimes into arena
//! offsets; [`exec`] binds addresses and runs the ops on any [`crate::backend::Backend`].
//!
//! Op arguments are the backends' own argument structs holding *virtual* addresses: a tensor
//! id in the high bits and a byte offset in the low bits ([`vaddr`]). Executing a program
//! rewrites each virtual address to `base(tensor) + offset`. So a view into a packed buffer
//! (the q, k, v columns of one QKV tensor, the EOS row of the CLIP output) is just an address
//! with an offset, exactly as a kernel sees it.

pub mod exec;
pub mod planner;

use crate::backend::{
    ActArgs, AddArgs, Addr, AttentionArgs, ConvT3dArgs, EmbedArgs, GemmArgs, Interp3dArgs,
    LayerNormArgs, LayerNormJointArgs, PatchGatherArgs,
};
use crate::dtype::DType;

/// Index of a tensor in its program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(pub u32);

/// Where a tensor's memory comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TensorKind {
    /// A checkpoint (or derived, load-time) tensor, by key, in the read-only weights region.
    Weight(String),
    /// Bound by the caller at run time: program inputs and outputs.
    External,
    /// An intermediate, placed in the arena by the planner.
    Activation,
}

/// A tensor of a program.
#[derive(Clone, Debug)]
pub struct TensorDesc {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub kind: TensorKind,
}

impl TensorDesc {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
}

/// One op, with virtual addresses.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Gemm(GemmArgs),
    Attention(AttentionArgs),
    LayerNorm(LayerNormArgs),
    LayerNormJoint(LayerNormJointArgs),
    ConvTranspose3d(ConvT3dArgs),
    Interp3d(Interp3dArgs),
    PatchGather3d(PatchGatherArgs),
    Add(AddArgs),
    Activation(ActArgs),
    Embed(EmbedArgs),
}

impl Op {
    /// The op-set name (DESIGN.md), for profiles and plans.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Gemm(_) => "gemm",
            Op::Attention(_) => "attention",
            Op::LayerNorm(_) => "layer_norm",
            Op::LayerNormJoint(_) => "layer_norm_joint",
            Op::ConvTranspose3d(_) => "conv_transpose3d_k2s2",
            Op::Interp3d(_) => "interp3d",
            Op::PatchGather3d(_) => "patch_embed3d",
            Op::Add(_) => "add",
            Op::Activation(_) => "activation",
            Op::Embed(_) => "embed_gather",
        }
    }

    /// Visits every address field, inputs and outputs alike.
    pub fn for_each_addr(&mut self, mut f: impl FnMut(&mut Addr)) {
        match self {
            Op::Gemm(a) => {
                f(&mut a.a);
                f(&mut a.b);
                f(&mut a.c);
                if let Some(b) = a.bias.as_mut() {
                    f(b);
                }
                if let Some(r) = a.residual.as_mut() {
                    f(&mut r.addr);
                }
            }
            Op::Attention(a) => {
                f(&mut a.q);
                f(&mut a.k);
                f(&mut a.v);
                f(&mut a.out);
            }
            Op::LayerNorm(a) => {
                f(&mut a.x);
                f(&mut a.out);
                f(&mut a.weight);
                f(&mut a.bias);
            }
            Op::LayerNormJoint(a) => {
                f(&mut a.x);
                f(&mut a.out);
                f(&mut a.weight);
                f(&mut a.bias);
            }
            Op::ConvTranspose3d(a) => {
                f(&mut a.x);
                f(&mut a.out);
                f(&mut a.weight);
                f(&mut a.bias);
            }
            Op::Interp3d(a) => {
                f(&mut a.x);
                f(&mut a.out);
            }
            Op::PatchGather3d(a) => {
                f(&mut a.x);
                f(&mut a.out);
            }
            Op::Add(a) => {
                f(&mut a.a);
                f(&mut a.b);
                f(&mut a.out);
            }
            Op::Activation(a) => {
                f(&mut a.x);
                f(&mut a.out);
            }
            Op::Embed(a) => {
                f(&mut a.ids);
                f(&mut a.table);
                f(&mut a.pos);
                f(&mut a.out);
            }
        }
    }

    /// Floating-point operations (multiply-add = 2), the counted floor for `segvol bench`.
    pub fn flops(&self) -> f64 {
        match self {
            Op::Gemm(a) => 2.0 * (a.batch * a.m * a.n * a.k) as f64,
            Op::Attention(a) => {
                let pairs = if a.causal {
                    // Row i sees i + 1 keys (nq == nk for the causal CLIP tower).
                    (a.nq * (a.nq + 1) / 2) as f64
                } else {
                    (a.nq * a.nk) as f64
                };
                4.0 * (a.batch * a.heads * a.head_dim) as f64 * pairs
            }
            Op::ConvTranspose3d(a) => {
                let vox: usize = a.dims.iter().product();
                2.0 * (a.batch * vox * a.cin * a.cout * 8) as f64
            }
            Op::LayerNorm(a) => 8.0 * (a.rows * a.cols) as f64,
            Op::LayerNormJoint(a) => 8.0 * (a.batch * a.n) as f64,
            Op::Interp3d(a) => {
                let n: usize = a.dst.iter().product();
                let per = if a.mode == crate::backend::InterpMode::Trilinear {
                    14.0
                } else {
                    0.0
                };
                per * (a.planes * n) as f64
            }
            Op::Add(a) => a.n as f64,
            Op::Activation(a) => 2.0 * a.n as f64,
            Op::PatchGather3d(_) | Op::Embed(_) => 0.0,
        }
    }
}

/// Bits of a virtual address that hold the byte offset (1 TiB); the tensor id is above.
const OFFSET_BITS: u32 = 40;
/// Marks an address as virtual, so a forgotten rewrite can never pass for a real pointer.
const VIRTUAL_TAG: u64 = 1 << 63;

/// The virtual address of byte `offset` of tensor `t`.
pub fn vaddr(t: TensorId, offset_bytes: usize) -> Addr {
    debug_assert!((offset_bytes as u64) < (1 << OFFSET_BITS));
    VIRTUAL_TAG | ((t.0 as u64) << OFFSET_BITS) | offset_bytes as u64
}

/// Splits a virtual address into tensor and byte offset.
pub fn split_vaddr(a: Addr) -> Option<(TensorId, usize)> {
    if a & VIRTUAL_TAG == 0 {
        return None;
    }
    let t = ((a & !VIRTUAL_TAG) >> OFFSET_BITS) as u32;
    Some((TensorId(t), (a & ((1 << OFFSET_BITS) - 1)) as usize))
}

/// One step of a program: an op and a label naming where in the model it sits.
#[derive(Clone, Debug)]
pub struct Step {
    pub label: String,
    pub op: Op,
}

/// An ordered list of ops on virtual tensors, for one shape key.
#[derive(Clone, Debug, Default)]
pub struct Program {
    pub name: String,
    pub tensors: Vec<TensorDesc>,
    pub steps: Vec<Step>,
    /// The storage dtype of activations and weights.
    pub dtype: Option<DType>,
}

impl Program {
    /// An empty program whose weights and activations are stored as `dtype`.
    pub fn new(name: impl Into<String>, dtype: DType) -> Self {
        Program {
            name: name.into(),
            tensors: Vec::new(),
            steps: Vec::new(),
            dtype: Some(dtype),
        }
    }

    /// The storage dtype.
    pub fn dtype(&self) -> DType {
        self.dtype.expect("program has a dtype")
    }

    fn add_tensor(
        &mut self,
        name: String,
        shape: Vec<usize>,
        dtype: DType,
        kind: TensorKind,
    ) -> TensorId {
        let id = TensorId(self.tensors.len() as u32);
        self.tensors.push(TensorDesc {
            name,
            shape,
            dtype,
            kind,
        });
        id
    }

    /// A caller-bound tensor (input or output).
    pub fn external(&mut self, name: impl Into<String>, shape: &[usize], dtype: DType) -> TensorId {
        self.add_tensor(name.into(), shape.to_vec(), dtype, TensorKind::External)
    }

    /// An intermediate in the program's storage dtype.
    pub fn activation(&mut self, name: impl Into<String>, shape: &[usize]) -> TensorId {
        let dtype = self.dtype();
        self.activation_of(name, shape, dtype)
    }

    /// An intermediate of an explicit dtype.
    pub fn activation_of(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        dtype: DType,
    ) -> TensorId {
        self.add_tensor(name.into(), shape.to_vec(), dtype, TensorKind::Activation)
    }

    /// A weight by checkpoint key (deduplicated).
    pub fn weight(&mut self, key: &str, shape: &[usize]) -> TensorId {
        if let Some(i) = self
            .tensors
            .iter()
            .position(|t| matches!(&t.kind, TensorKind::Weight(k) if k == key))
        {
            debug_assert_eq!(
                self.tensors[i].shape, shape,
                "weight {key} used with two shapes"
            );
            return TensorId(i as u32);
        }
        let dtype = self.dtype();
        self.add_tensor(
            key.to_string(),
            shape.to_vec(),
            dtype,
            TensorKind::Weight(key.to_string()),
        )
    }

    /// The descriptor of `t`.
    pub fn desc(&self, t: TensorId) -> &TensorDesc {
        &self.tensors[t.0 as usize]
    }

    /// The virtual address of element `elem` of `t`.
    pub fn at(&self, t: TensorId, elem: usize) -> Addr {
        let d = self.desc(t);
        debug_assert!(elem <= d.numel(), "{}: element {elem} out of range", d.name);
        vaddr(t, elem * d.dtype.size())
    }

    /// The virtual address of `t`'s first element.
    pub fn addr(&self, t: TensorId) -> Addr {
        self.at(t, 0)
    }

    /// Appends an op.
    pub fn push(&mut self, label: impl Into<String>, op: Op) {
        self.steps.push(Step {
            label: label.into(),
            op,
        });
    }

    /// Total counted FLOPs.
    pub fn flops(&self) -> f64 {
        self.steps.iter().map(|s| s.op.flops()).sum()
    }

    /// Finds a tensor by name.
    pub fn find(&self, name: &str) -> Option<TensorId> {
        self.tensors
            .iter()
            .position(|t| t.name == name)
            .map(|i| TensorId(i as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_addresses_round_trip() {
        for (t, off) in [(0u32, 0usize), (7, 12), (4000, (1 << 40) - 1)] {
            assert_eq!(
                split_vaddr(vaddr(TensorId(t), off)),
                Some((TensorId(t), off))
            );
        }
        assert_eq!(split_vaddr(0x7fff_0000_1000), None);
    }
}
