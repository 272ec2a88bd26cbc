//! The `dynq.DynQMatMul` kernel: attribute parsing, weight packing at kernel creation, and the
//! computation on ONNX Runtime's intra-op thread pool.

use super::api::{self, Api, TensorShape, ELEM_FLOAT, ELEM_FLOAT16, ELEM_INT8, ELEM_UINT8};
use super::cache;
use crate::dtype::Element;
use crate::gemm::{
    gemm_fused_on, gemm_split_on, layer_norm_rows, Epilogue, Fused, GemmOptions, Heads, LayerNorm, Parallel, Residual,
    SplitOut,
};
use crate::pack::{PackOptions, PackedWeights, WeightLayout};
use crate::quant::{ActGranularity, ActType};
use crate::Error;
use ort_sys::{OrtKernelContext, OrtKernelInfo, OrtValue};
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// The optional inputs of one call: smoothing factors, bias, residual data, layer norm.
type FusedArgs<'a> = (Option<&'a [f32]>, Option<&'a [f32]>, Option<*const u8>, Option<LayerNorm<'a>>, Option<Heads>);

/// The optional inputs of a call with a broadcast residual: smoothing factors, bias, layer
/// norm, A's head layout.
type BroadcastArgs<'a> = (Option<&'a [f32]>, Option<&'a [f32]>, Option<LayerNorm<'a>>, Option<Heads>);

/// Input indices.
pub const IN_A: usize = 0;
pub const IN_W: usize = 1;
pub const IN_SCALES: usize = 2;
pub const IN_BIAS: usize = 3;
pub const IN_SMOOTH: usize = 4;
pub const IN_RESIDUAL: usize = 5;
pub const IN_LN_SCALE: usize = 6;
pub const IN_LN_BIAS: usize = 7;
/// Inputs at most.
pub const MAX_INPUTS: usize = 8;
/// The `ln_epsilon` attribute's default (ONNX `LayerNormalization`'s).
pub const LN_EPSILON_DEFAULT: f32 = 1e-5;

/// The activation fused after the bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    Relu,
    Gelu,
    GeluTanh,
    Silu,
    QuickGelu,
}

/// The node's attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attrs {
    pub act_granularity: ActGranularity,
    pub act_type: ActType,
    pub activation: Activation,
    /// `a_layout = "heads"`: A is `[batch, heads, seq, d]`, read as `[batch, seq, heads * d]`.
    pub a_heads: bool,
}

/// Parses the attributes; absent ones take their defaults (per_row, asymmetric_u8, none).
pub fn parse_attrs(get: impl Fn(&str) -> Result<Option<String>, String>) -> Result<Attrs, String> {
    fn pick<T: Copy>(name: &str, v: Option<String>, default: T, allowed: &[(&str, T)]) -> Result<T, String> {
        match v {
            None => Ok(default),
            Some(s) => allowed.iter().find(|(n, _)| *n == s).map(|(_, t)| *t).ok_or_else(|| {
                let names: Vec<String> = allowed.iter().map(|(n, _)| format!("\"{n}\"")).collect();
                format!("attribute '{name}' is \"{s}\"; expected one of {}", names.join(", "))
            }),
        }
    }
    Ok(Attrs {
        act_granularity: pick(
            "act_granularity",
            get("act_granularity")?,
            ActGranularity::PerRow,
            &[("per_row", ActGranularity::PerRow), ("per_tensor", ActGranularity::PerTensor)],
        )?,
        act_type: pick(
            "act_type",
            get("act_type")?,
            ActType::AsymmetricU8,
            &[("asymmetric_u8", ActType::AsymmetricU8), ("symmetric_i8", ActType::SymmetricI8)],
        )?,
        activation: pick(
            "activation",
            get("activation")?,
            Activation::None,
            &[
                ("none", Activation::None),
                ("relu", Activation::Relu),
                ("gelu", Activation::Gelu),
                ("gelu_tanh", Activation::GeluTanh),
                ("silu", Activation::Silu),
                ("quick_gelu", Activation::QuickGelu),
            ],
        )?,
        a_heads: pick("a_layout", get("a_layout")?, false, &[("rows", false), ("heads", true)])?,
    })
}

/// The `heads` and `heads_transposed` attributes: one `(heads, transposed)` per output, where
/// `heads == 0` is the plain layout `[..., width]` and `heads > 0` writes the output as
/// `[batch, heads, seq, width / heads]` (or `[batch, heads, width / heads, seq]` when
/// transposed) for A `[batch, seq, K]`: the Reshape and Transpose that usually follow a query,
/// key or value projection.
pub fn parse_heads(
    heads: Option<Vec<i64>>,
    transposed: Option<Vec<i64>>,
    outputs: usize,
) -> Result<Vec<(usize, bool)>, String> {
    let Some(h) = heads else {
        if transposed.is_some() {
            return Err("attribute 'heads_transposed' needs the attribute 'heads'".into());
        }
        return Ok(vec![(0, false); outputs]);
    };
    if h.len() != outputs || h.iter().any(|&v| v < 0) {
        return Err(format!("attribute 'heads' must hold one count >= 0 per output ({outputs}), got {h:?}"));
    }
    let t = transposed.unwrap_or_else(|| vec![0; outputs]);
    if t.len() != outputs || t.iter().any(|&v| v != 0 && v != 1) {
        return Err(format!("attribute 'heads_transposed' must hold one 0 or 1 per output ({outputs}), got {t:?}"));
    }
    if let Some(g) = (0..outputs).find(|&g| t[g] == 1 && h[g] == 0) {
        return Err(format!("attribute 'heads_transposed' is 1 for output {g}, which has no heads"));
    }
    Ok(h.iter().zip(&t).map(|(&h, &t)| (h as usize, t == 1)).collect())
}

/// An error of the op, with the ONNX Runtime error code to report it with.
pub struct OpError {
    pub code: ort_sys::OrtErrorCode,
    pub msg: String,
}

impl OpError {
    pub fn invalid(msg: String) -> Self {
        OpError { code: ort_sys::OrtErrorCode::ORT_INVALID_ARGUMENT, msg }
    }
    pub fn fail(msg: String) -> Self {
        OpError { code: ort_sys::OrtErrorCode::ORT_FAIL, msg }
    }
}

impl From<Error> for OpError {
    fn from(e: Error) -> Self {
        match e {
            Error::OutOfMemory(_) | Error::Internal(_) => OpError::fail(e.to_string()),
            _ => OpError::invalid(e.to_string()),
        }
    }
}

impl From<String> for OpError {
    fn from(msg: String) -> Self {
        OpError::fail(msg)
    }
}

/// One kernel instance (one node of one session).
pub struct DynqKernel {
    pub(crate) api: Api,
    /// "DynQMatMul node 'name'", for messages.
    label: String,
    attrs: Attrs,
    /// Packed once at creation when W and its scales are constant initializers; else packed per call.
    weights: Option<Arc<PackedWeights>>,
    /// The `split` attribute: the widths of the node's outputs (columns of the product, in
    /// order), or None for one output.
    split: Option<Vec<usize>>,
    /// Per output: `(heads, transposed)`, `heads == 0` for the plain layout (see
    /// [`parse_heads`]).
    heads: Vec<(usize, bool)>,
    /// The `ln_epsilon` attribute (used when the node has a layer norm scale).
    ln_epsilon: f32,
    /// What the node has seen of its session's intra-op pool.
    probe: PoolProbe,
}

/// Whether a session's intra-op pool has threads besides the caller, learned from where the
/// tasks of this node's `ParallelFor` calls ran (the C API does not tell a kernel its pool size).
/// A single-threaded session runs every task on the calling thread; `ParallelFor` then still costs
/// tens of microseconds per node and run (measured: all-MiniLM-L6-v2, 1 x 128 tokens, 1 thread:
/// 13.7-14.1 ms per run with it, 12.3-12.7 without), so once PROBE_CALLS calls ran entirely on the
/// caller (and none elsewhere), the node runs inline.
///
/// A pool with threads can look single-threaded for a while: its worker may not get a core in
/// time while another session's workers spin or another process runs. So an inline node still
/// goes through the pool now and then, first after `1 << PROBE_FIRST_SHIFT` calls and then at
/// gaps that double up to `1 << PROBE_MAX_SHIFT` calls: a busy pool is found again within a few
/// calls, while a truly single-threaded session soon pays for one probe in 64 calls only.
/// (ONNX Runtime's workers spin for 30-60 ms after a run, measured here: a 2-thread session run
/// right after another one's ran at 1-thread speed, every task of a node on the caller.)
/// Results do not depend on this: they are bit-identical for every thread count.
#[derive(Debug, Default)]
struct PoolProbe {
    /// A task ran on another thread: the pool has workers (kept from then on).
    multi: AtomicBool,
    /// `ParallelFor` calls whose tasks all ran on the calling thread.
    inline_calls: AtomicU32,
    /// Calls run inline since the last probe.
    skipped: AtomicU32,
    /// Probes made so far while inline (each doubles the next gap, up to the cap).
    probes: AtomicU32,
}

const PROBE_CALLS: u32 = 8;
const PROBE_FIRST_SHIFT: u32 = 3;
const PROBE_MAX_SHIFT: u32 = 6;

impl PoolProbe {
    /// Whether this call should run without the pool (false: split the work and observe).
    fn inline(&self) -> bool {
        if self.multi.load(Ordering::Relaxed) || self.inline_calls.load(Ordering::Relaxed) < PROBE_CALLS {
            return false;
        }
        let shift = (PROBE_FIRST_SHIFT + self.probes.load(Ordering::Relaxed)).min(PROBE_MAX_SHIFT);
        if self.skipped.fetch_add(1, Ordering::Relaxed) < 1 << shift {
            return true;
        }
        // Probe this call. Concurrent runs of one session may race here; the worst outcome is
        // one probe more or less.
        self.skipped.store(0, Ordering::Relaxed);
        let _ = self.probes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
            (PROBE_FIRST_SHIFT + p < PROBE_MAX_SHIFT).then_some(p + 1)
        });
        false
    }

    fn record(&self, foreign: bool, label: &str) {
        if foreign {
            if !self.multi.swap(true, Ordering::Relaxed)
                && self.inline_calls.load(Ordering::Relaxed) >= PROBE_CALLS
                && std::env::var_os("DYNQ_ORT_VERBOSE").is_some()
            {
                eprintln!("dynq: {label}: a probe found the session's pool with workers; running in parallel again");
            }
        } else if self.inline_calls.fetch_add(1, Ordering::Relaxed) + 1 == PROBE_CALLS
            && !self.multi.load(Ordering::Relaxed)
            && std::env::var_os("DYNQ_ORT_VERBOSE").is_some()
        {
            eprintln!(
                "dynq: {label}: the session's pool ran every task on the calling thread; running single-threaded \
                 (probing it again now and then)"
            );
        }
    }
}

fn expect_weight_elem(s: &TensorShape) -> Result<(), String> {
    match s.elem {
        ELEM_INT8 => Ok(()),
        ELEM_UINT8 => Err(format!(
            "weight W is uint8; DynQMatMul takes int8 weights (python -m dynq.onnx quantize converts uint8 \
             weights with their zero points), got {}",
            s.describe()
        )),
        _ => Err(format!("weight W must be an int8 tensor [K, N], got {}", s.describe())),
    }
}

/// `(n, k)` of a weight tensor `[K, N]` with 1 or N scales.
fn weight_dims(w: &TensorShape, scales: &TensorShape) -> Result<(usize, usize), String> {
    expect_weight_elem(w)?;
    if w.dims.len() != 2 {
        return Err(format!("weight W must have rank 2 ([K, N]), got {}", w.describe()));
    }
    if scales.elem != ELEM_FLOAT {
        return Err(format!("weight scales must be float, got {}", scales.describe()));
    }
    let (k, n) = (w.dims[0], w.dims[1]);
    if k <= 0 || n <= 0 {
        return Err(format!("weight W has an empty dimension: {}", w.describe()));
    }
    let ns = scales.numel().unwrap_or(0);
    if scales.dims.len() > 1 || (ns != 1 && ns as i64 != n) {
        return Err(format!(
            "weight scales must have 1 (per tensor) or N = {n} (per output channel) values in a tensor of rank 0 or 1, \
             got {}",
            scales.describe()
        ));
    }
    Ok((n as usize, k as usize))
}

/// Packs W (`[K, N]` int8) with its scales, through the shared cache or not.
///
/// # Safety
/// `w` and `s` are live tensor values.
unsafe fn pack_from_values(
    api: Api,
    w: *const OrtValue,
    s: *const OrtValue,
    shared: bool,
) -> Result<(Arc<PackedWeights>, bool), OpError> {
    // SAFETY: per the contract.
    let (ws, ss) = unsafe { (api::value_shape(api, w)?, api::value_shape(api, s)?) };
    let (n, k) = weight_dims(&ws, &ss).map_err(OpError::invalid)?;
    let ns = ss.numel().unwrap_or(0);
    // SAFETY: the shapes were checked: W holds n * k int8 values and the scales `ns` floats.
    let (q, scales) = unsafe {
        (
            std::slice::from_raw_parts(api::value_data(api, w)?.cast::<i8>().cast_const(), n * k),
            std::slice::from_raw_parts(api::value_data(api, s)?.cast::<f32>().cast_const(), ns),
        )
    };
    if shared {
        Ok(cache::get_or_pack(q, n, k, scales)?)
    } else {
        Ok((Arc::new(PackedWeights::from_quantized(q, n, k, WeightLayout::KN, scales, PackOptions::default())?), false))
    }
}

/// The widths of `split` must add up to the weight's N.
fn check_split(widths: &[usize], n: usize) -> Result<(), String> {
    if widths.iter().try_fold(0usize, |t, &c| t.checked_add(c)) != Some(n) {
        return Err(format!("attribute 'split' {widths:?} must add up to the weight's N = {n}"));
    }
    Ok(())
}

/// Per output `(heads, transposed)`, and the sequence length (A's dimension 1).
type HeadsArg<'a> = (&'a [(usize, bool)], usize);

/// Each output with heads must split evenly into them.
fn check_heads(widths: &[usize], heads: &[(usize, bool)]) -> Result<(), String> {
    for (g, (&c, &(h, _))) in widths.iter().zip(heads).enumerate() {
        if h > 0 && !c.is_multiple_of(h) {
            return Err(format!("output {g} has {c} columns, which do not split into {h} heads (attribute 'heads')"));
        }
    }
    Ok(())
}

impl DynqKernel {
    fn gemm_options(&self) -> GemmOptions {
        GemmOptions {
            act_granularity: self.attrs.act_granularity,
            act_type: self.attrs.act_type,
            epilogue: match self.attrs.activation {
                Activation::None => Epilogue::None,
                Activation::Relu => Epilogue::Relu,
                Activation::Gelu => Epilogue::Gelu,
                Activation::GeluTanh => Epilogue::GeluTanh,
                Activation::Silu => Epilogue::Silu,
                Activation::QuickGelu => Epilogue::QuickGelu,
            },
            num_threads: 1, // not used: the work runs on ONNX Runtime's pool
        }
    }

    /// The product plus a residual of another shape, broadcast as ONNX's `Add` does: the
    /// product (with its bias and activation) goes to an f32 buffer, then each element of the
    /// broadcast shape is `T(p + r)`, the f32 addition and rounding of the fused residual. One
    /// more pass over the output than the fused path; the converter folds an `Add` whose shapes
    /// shape inference cannot prove equal (PyTorch exports name the batch size of a block's
    /// output and of its skip connection differently), and at run time they mostly are equal.
    ///
    /// # Safety
    /// `ctx` is live; `a_val` is input A (`a_shape`, m * k values); `r` points to the
    /// residual's values (`r_dims`, A's type).
    #[allow(clippy::too_many_arguments)]
    unsafe fn broadcast_residual(
        &self,
        ctx: *mut OrtKernelContext,
        w: &PackedWeights,
        a_val: *const OrtValue,
        a_shape: &TensorShape,
        (p_dims, m, k): (&[i64], usize, usize),
        (smooth, bias, layer_norm, a_heads): BroadcastArgs<'_>,
        r: Option<*const u8>,
        r_dims: &[i64],
        y_dims: &[i64],
    ) -> crate::Result<()> {
        let api = self.api;
        if layer_norm.is_some() && y_dims.last() != p_dims.last() {
            return Err(Error::InvalidArgument(format!(
                "a layer norm normalizes rows of N = {} values, but the residual broadcasts the output to {y_dims:?}",
                w.n()
            )));
        }
        let total = api::numel(y_dims)
            .ok_or_else(|| Error::InvalidArgument(format!("the broadcast output shape {y_dims:?} is too large")))?;
        let r_len =
            api::numel(r_dims).ok_or_else(|| Error::InvalidArgument(format!("bad residual shape {r_dims:?}")))?;
        let r = r.ok_or_else(|| Error::Internal("residual data missing".into()))?;
        // SAFETY (all calls): `ctx` is live.
        let Some(y_ptr) = unsafe { output(api, ctx, 0, y_dims, a_shape.elem, total == 0) }.map_err(Error::Internal)?
        else {
            return Ok(());
        };
        let a_ptr = unsafe { api::value_data(api, a_val.cast_mut()) }.map_err(Error::Internal)?;
        let opts = self.gemm_options();
        let pool = OrtPool { api, ctx, probe: &self.probe, label: &self.label };
        let n = w.n();
        let mut p = vec![0f32; m * n];
        /// # Safety
        /// As the caller's, with `a`, `r` and `y` holding m * k, r_len and total values of T.
        #[allow(clippy::too_many_arguments)]
        unsafe fn go<T: Element>(
            w: &PackedWeights,
            (a, r, y): (*const u8, *const u8, *mut u8),
            (m, k, r_len, total): (usize, usize, usize, usize),
            fused: &Fused<'_, f32>,
            layer_norm: Option<LayerNorm<'_>>,
            p: &mut [f32],
            (p_dims, r_dims, y_dims): (&[i64], &[i64], &[i64]),
            opts: &GemmOptions,
            pool: &OrtPool<'_>,
        ) -> crate::Result<()> {
            let align = std::mem::align_of::<T>();
            if [a, r, y.cast_const()].iter().any(|p| !(*p as usize).is_multiple_of(align)) {
                return Err(Error::InvalidArgument(format!("a tensor buffer is not aligned to {align} bytes")));
            }
            // SAFETY: per the contract; aligned (checked above); the output is ours alone.
            let (a, r, y) = unsafe {
                (
                    std::slice::from_raw_parts(a.cast::<T>(), m * k),
                    std::slice::from_raw_parts(r.cast::<T>(), r_len),
                    std::slice::from_raw_parts_mut(y.cast::<T>(), total),
                )
            };
            gemm_fused_on(w, a, m, k, fused, p, w.n(), opts, pool)?;
            broadcast_add(p, p_dims, r, r_dims, y, y_dims);
            if let Some(ln) = layer_norm {
                // Rows of N values (checked by the caller), normalized as the fused path does.
                let n = w.n();
                let isa = w.kernel().isa;
                let rows = y.len().checked_div(n).unwrap_or(0);
                // SAFETY: `y` holds rows * n values of T, ours alone.
                unsafe { layer_norm_rows(isa, y.as_mut_ptr(), rows, n, n, &ln) };
            }
            Ok(())
        }
        let fused = Fused { smooth, bias, a_heads, ..Fused::default() };
        let bufs = (a_ptr.cast_const(), r, y_ptr);
        let sizes = (m, k, r_len, total);
        let dims = (p_dims, r_dims, y_dims);
        // SAFETY: per the contract; the output was just allocated with `total` values of A's type.
        unsafe {
            if a_shape.elem == ELEM_FLOAT16 {
                go::<half::f16>(w, bufs, sizes, &fused, layer_norm, &mut p, dims, &opts, &pool)
            } else {
                go::<f32>(w, bufs, sizes, &fused, layer_norm, &mut p, dims, &opts, &pool)
            }
        }
    }
    /// Builds the kernel: parses attributes, checks the node's inputs and packs constant weights.
    ///
    /// # Safety
    /// `info` is a live kernel info.
    pub unsafe fn create(api: Api, info: *const OrtKernelInfo) -> Result<Self, OpError> {
        // SAFETY: per the contract (for every call below).
        let name = unsafe { api::node_name(api, info) };
        let label = format!("DynQMatMul node '{name}'");
        let err = |m: String| OpError::invalid(format!("{label}: {m}"));
        let count = unsafe { api::kernel_info_input_count(api, info) }.map_err(&err)?;
        if !(3..=MAX_INPUTS).contains(&count) {
            return Err(err(format!("expects {}, got {count}", super::INPUTS_EXPECTED)));
        }
        let attrs = parse_attrs(|n| unsafe { api::attr_string(api, info, n) }).map_err(&err)?;
        let outputs = unsafe { api::kernel_info_output_count(api, info) }.map_err(&err)?;
        let split = match unsafe { api::attr_ints(api, info, "split") }.map_err(&err)? {
            None if outputs == 1 => None,
            None => return Err(err(format!("has {outputs} outputs but no 'split' attribute giving their widths"))),
            Some(v) => {
                if v.len() != outputs || v.iter().any(|&c| c <= 0) {
                    return Err(err(format!(
                        "attribute 'split' must hold one positive width per output ({outputs}), got {v:?}"
                    )));
                }
                Some(v.iter().map(|&c| c as usize).collect::<Vec<usize>>())
            }
        };
        let heads = parse_heads(
            unsafe { api::attr_ints(api, info, "heads") }.map_err(&err)?,
            unsafe { api::attr_ints(api, info, "heads_transposed") }.map_err(&err)?,
            outputs,
        )
        .map_err(&err)?;
        let w = unsafe { api::constant_input(api, info, IN_W) }.map_err(&err)?;
        let s = unsafe { api::constant_input(api, info, IN_SCALES) }.map_err(&err)?;
        let weights = match (w, s) {
            (Some(w), Some(s)) => {
                let (p, shared) = unsafe { pack_from_values(api, w, s, true) }.map_err(|e| err(e.msg))?;
                if std::env::var_os("DYNQ_ORT_VERBOSE").is_some() {
                    eprintln!(
                        "dynq: {label}: weight {}x{} {} ({} bytes)",
                        p.k(),
                        p.n(),
                        if shared { "shared with another session" } else { "packed" },
                        p.bytes()
                    );
                }
                Some(p)
            }
            _ => {
                if std::env::var_os("DYNQ_ORT_VERBOSE").is_some() {
                    eprintln!("dynq: {label}: weight is not a constant initializer; it is packed at every call (slow)");
                }
                None
            }
        };
        if let (Some(p), Some(widths)) = (&weights, &split) {
            check_split(widths, p.n()).map_err(&err)?;
        }
        if let Some(p) = &weights {
            let widths = split.clone().unwrap_or_else(|| vec![p.n()]);
            check_heads(&widths, &heads).map_err(&err)?;
        }
        let ln_epsilon =
            unsafe { api::attr_float(api, info, "ln_epsilon") }.map_err(&err)?.unwrap_or(LN_EPSILON_DEFAULT);
        if !(ln_epsilon.is_finite() && ln_epsilon >= 0.0) {
            return Err(err(format!("attribute 'ln_epsilon' is {ln_epsilon}; it must be finite and >= 0")));
        }
        Ok(DynqKernel { api, label, attrs, weights, split, heads, ln_epsilon, probe: PoolProbe::default() })
    }

    /// Runs the node.
    ///
    /// # Safety
    /// `ctx` is a live kernel context of this kernel's node.
    pub unsafe fn compute(&self, ctx: *mut OrtKernelContext) -> Result<(), OpError> {
        let api = self.api;
        let label = &self.label;
        let err = |m: String| OpError::invalid(format!("{label}: {m}"));
        let fail = |m: String| OpError::fail(format!("{label}: {m}"));
        // SAFETY (all calls below): `ctx` is live; values obtained from it are live during the call.
        let a_val = unsafe { api::context_input(api, ctx, IN_A) }
            .map_err(fail)?
            .ok_or_else(|| err("input A is missing".into()))?;
        let a_shape = unsafe { api::value_shape(api, a_val) }.map_err(fail)?;
        if a_shape.elem != ELEM_FLOAT && a_shape.elem != ELEM_FLOAT16 {
            return Err(err(format!("input A must be float or float16, got {}", a_shape.describe())));
        }
        if a_shape.dims.is_empty() {
            return Err(err(format!("input A must have rank >= 1 ([..., K]), got a scalar {}", a_shape.describe())));
        }
        let per_call;
        let w: &PackedWeights = match &self.weights {
            Some(p) => p,
            None => {
                let wv = unsafe { api::context_input(api, ctx, IN_W) }
                    .map_err(fail)?
                    .ok_or_else(|| err("input W is missing".into()))?;
                let sv = unsafe { api::context_input(api, ctx, IN_SCALES) }
                    .map_err(fail)?
                    .ok_or_else(|| err("input scales is missing".into()))?;
                per_call = unsafe { pack_from_values(api, wv, sv, false) }.map_err(|e| err(e.msg))?.0;
                &per_call
            }
        };
        let (n, k) = (w.n(), w.k());
        // With a_layout = "heads", A is [batch, heads, seq, d] and the product reads it as
        // [batch, seq, heads * d].
        let a_heads = if self.attrs.a_heads {
            if a_shape.dims.len() != 4 {
                return Err(err(format!(
                    "attribute a_layout = \"heads\" needs A of rank 4 ([batch, heads, seq, d]), got {}",
                    a_shape.describe()
                )));
            }
            let d = &a_shape.dims;
            Some((d[0], d[1], d[2], d[3]))
        } else {
            None
        };
        let a_k = match a_heads {
            Some((_, h, _, d)) => h.saturating_mul(d),
            None => *a_shape.dims.last().expect("rank >= 1"),
        };
        if a_k != k as i64 {
            return Err(err(format!(
                "input A has K = {a_k} (shape {:?}) but the weight has K = {k} (W is [{k}, {n}])",
                a_shape.dims
            )));
        }
        let a_len = a_shape.numel().ok_or_else(|| err(format!("input A has a bad shape {:?}", a_shape.dims)))?;
        let m = a_len / k;
        // The product's layout of A, as the library takes it.
        let a_layout = match a_heads {
            Some((_, h, s, _)) if m > 0 => Some(Heads { heads: h as usize, seq: s as usize, transposed: false }),
            _ => None,
        };
        if a_heads.is_some() && (self.split.is_some() || self.heads.iter().any(|&(h, _)| h > 0)) {
            return Err(err("a_layout = \"heads\" cannot be combined with 'split' or 'heads'".into()));
        }
        /// Optional input `index`: absent, or a float tensor `[len]` (`what` and `dim` name it
        /// in the error, which `label` prefixes as `err` and `fail` do).
        ///
        /// # Safety
        /// `ctx` is live; the slice lives as long as the input, i.e. during this call.
        unsafe fn float_vector<'a>(
            api: Api,
            ctx: *mut OrtKernelContext,
            label: &str,
            index: usize,
            len: usize,
            (what, dim): (&str, &str),
        ) -> Result<Option<&'a [f32]>, OpError> {
            let fail = |m: String| OpError::fail(format!("{label}: {m}"));
            // SAFETY (all calls): `ctx` is live.
            let Some(v) = (unsafe { api::context_input(api, ctx, index) }).map_err(fail)? else {
                return Ok(None);
            };
            let sh = unsafe { api::value_shape(api, v) }.map_err(fail)?;
            if sh.elem != ELEM_FLOAT || sh.dims.len() != 1 || sh.dims[0] != len as i64 {
                let m = format!("{what} must be a float tensor [{dim}] = [{len}], got {}", sh.describe());
                return Err(OpError::invalid(format!("{label}: {m}")));
            }
            let p = unsafe { api::value_data(api, v) }.map_err(fail)?;
            // SAFETY: checked: `len` floats.
            Ok(Some(unsafe { std::slice::from_raw_parts(p.cast::<f32>().cast_const(), len) }))
        }
        let bias = unsafe { float_vector(api, ctx, label, IN_BIAS, n, ("bias", "N")) }?;
        let smooth = unsafe { float_vector(api, ctx, label, IN_SMOOTH, k, ("smoothing factors", "K")) }?;
        let ln_scale = unsafe { float_vector(api, ctx, label, IN_LN_SCALE, n, ("layer norm scale", "N")) }?;
        let ln_bias = unsafe { float_vector(api, ctx, label, IN_LN_BIAS, n, ("layer norm bias", "N")) }?;
        let layer_norm = match (ln_scale, ln_bias) {
            (Some(gamma), beta) => Some(LayerNorm { gamma, beta, epsilon: self.ln_epsilon }),
            (None, Some(_)) => return Err(err("a layer norm bias needs a layer norm scale (input 6)".into())),
            (None, None) => None,
        };
        if layer_norm.is_some() && (self.split.is_some() || self.heads.iter().any(|&(h, _)| h > 0)) {
            return Err(err("a layer norm cannot be combined with 'split' or 'heads'".into()));
        }
        let mut out_dims = match a_heads {
            Some((b, _, s, _)) => vec![b, s, k as i64],
            None => a_shape.dims.clone(),
        };
        *out_dims.last_mut().expect("rank >= 1") = n as i64;
        // Optional residual: A's type, added after the activation. Of the product's shape (the
        // fused path), or of any shape that broadcasts with it as ONNX's Add does: the output
        // then has the broadcast shape (see `broadcast_residual`).
        let mut broadcast: Option<(Vec<i64>, Vec<i64>)> = None; // (residual dims, output dims)
        let residual = match unsafe { api::context_input(api, ctx, IN_RESIDUAL) }.map_err(fail)? {
            None => None,
            Some(v) => {
                let sh = unsafe { api::value_shape(api, v) }.map_err(fail)?;
                if sh.elem != a_shape.elem {
                    return Err(err(format!(
                        "residual must have A's type {}, got {}",
                        api::elem_name(a_shape.elem),
                        sh.describe()
                    )));
                }
                if sh.dims != out_dims {
                    let b = broadcast_dims(&out_dims, &sh.dims).ok_or_else(|| {
                        err(format!(
                            "residual of shape {:?} does not broadcast with the product's shape {out_dims:?}",
                            sh.dims
                        ))
                    })?;
                    broadcast = Some((sh.dims.clone(), b));
                }
                Some(unsafe { api::value_data(api, v) }.map_err(fail)?.cast_const())
            }
        };
        // The outputs: one [..., N], or one [..., width] per `split` entry.
        let widths: Vec<usize> = match &self.split {
            None => vec![n],
            Some(w) => {
                check_split(w, n).map_err(&err)?;
                if residual.is_some() {
                    return Err(err("a residual cannot be combined with several outputs ('split')".into()));
                }
                w.clone()
            }
        };
        let with_heads = self.heads.iter().any(|&(h, _)| h > 0);
        if with_heads {
            check_heads(&widths, &self.heads).map_err(&err)?;
            if a_shape.dims.len() != 3 {
                return Err(err(format!(
                    "attribute 'heads' needs A of rank 3 ([batch, seq, K]), got {}",
                    a_shape.describe()
                )));
            }
            if residual.is_some() {
                return Err(err("a residual cannot be combined with the attribute 'heads'".into()));
            }
        }
        if let Some((r_dims, y_dims)) = &broadcast {
            // SAFETY: `ctx` is live, `residual` is the data of an input of shape `r_dims` and
            // A's type, `a_val` A's value of shape `a_shape`.
            return unsafe {
                self.broadcast_residual(
                    ctx,
                    w,
                    a_val,
                    &a_shape,
                    (&out_dims, m, k),
                    (smooth, bias, layer_norm, a_layout),
                    residual,
                    r_dims,
                    y_dims,
                )
            }
            .map_err(OpError::from)
            .map_err(|e| OpError { code: e.code, msg: format!("{label}: {}", e.msg) });
        }
        let mut ys: Vec<*mut u8> = Vec::with_capacity(widths.len());
        for (g, &cols) in widths.iter().enumerate() {
            let mut dims = out_dims.clone();
            *dims.last_mut().expect("rank >= 1") = cols as i64;
            if let (h @ 1.., transposed) = self.heads[g] {
                // [batch, heads, seq, d] or [batch, heads, d, seq].
                let d = (cols / h) as i64;
                dims = vec![a_shape.dims[0], h as i64, a_shape.dims[1], d];
                if transposed {
                    dims.swap(2, 3);
                }
            }
            if let Some(y) = unsafe { output(api, ctx, g, &dims, a_shape.elem, m == 0) }.map_err(fail)? {
                ys.push(y);
            }
        }
        if m == 0 {
            return Ok(());
        }
        let a_ptr = unsafe { api::value_data(api, a_val) }.map_err(fail)?;
        let opts = self.gemm_options();
        let pool = OrtPool { api, ctx, probe: &self.probe, label };
        /// # Safety
        /// `a` points to `m * k` values of type `T`, `ys[g]` to `m * widths[g]` (the outputs,
        /// distinct buffers, aliased by nothing), `residual` (if any, with one output) to
        /// `m * n` values of type `T`.
        unsafe fn run<T: Element>(
            w: &PackedWeights,
            a: *const u8,
            (ys, widths, heads): (&[*mut u8], &[usize], Option<HeadsArg<'_>>),
            (m, k): (usize, usize),
            (smooth, bias, residual, layer_norm, a_heads): FusedArgs<'_>,
            opts: &GemmOptions,
            pool: &OrtPool,
        ) -> crate::Result<()> {
            let align = std::mem::align_of::<T>();
            let aligned = |p: *const u8| (p as usize).is_multiple_of(align);
            if !aligned(a) || ys.iter().any(|&y| !aligned(y)) || residual.is_some_and(|r| !aligned(r)) {
                return Err(Error::InvalidArgument(format!("a tensor buffer is not aligned to {align} bytes")));
            }
            let n = w.n();
            // SAFETY: per the contract; alignment checked above.
            let (a, residual) = unsafe {
                (
                    std::slice::from_raw_parts(a.cast::<T>(), m * k),
                    residual.map(|r| Residual { data: std::slice::from_raw_parts(r.cast::<T>(), m * n), ld: n }),
                )
            };
            if let ([y], None) = (ys, heads) {
                // SAFETY: per the contract.
                let y = unsafe { std::slice::from_raw_parts_mut(y.cast::<T>(), m * n) };
                let fused = Fused { smooth, bias, residual, layer_norm, a_heads };
                return gemm_fused_on(w, a, m, k, &fused, y, n, opts, pool);
            }
            let mut outs: Vec<SplitOut<'_, T>> = ys
                .iter()
                .zip(widths)
                .enumerate()
                // SAFETY: per the contract: distinct buffers of m * cols values each.
                .map(|(g, (&y, &cols))| SplitOut {
                    y: unsafe { std::slice::from_raw_parts_mut(y.cast::<T>(), m * cols) },
                    ldy: cols,
                    cols,
                    heads: heads.and_then(|(h, seq)| {
                        let (heads, transposed) = h[g];
                        (heads > 0).then_some(Heads { heads, seq, transposed })
                    }),
                })
                .collect();
            gemm_split_on(w, a, m, k, smooth, bias, &mut outs, opts, pool)
        }
        // SAFETY: A holds m * k values of its element type (its shape), the residual m * n of
        // that type (checked above), each output was just allocated with m * width values of
        // the same type (checked above) and nobody else sees them until this call returns
        // (ONNX Runtime gives a custom op's outputs buffers of their own).
        let r = unsafe {
            // With heads, A is [batch, seq, K] (checked above).
            let heads = with_heads.then(|| (&self.heads[..], a_shape.dims[1] as usize));
            let fused = (smooth, bias, residual, layer_norm, a_layout);
            let args = (a_ptr.cast_const(), (&ys[..], &widths[..], heads), (m, k), fused);
            if a_shape.elem == ELEM_FLOAT16 {
                run::<half::f16>(w, args.0, args.1, args.2, args.3, &opts, &pool)
            } else {
                run::<f32>(w, args.0, args.1, args.2, args.3, &opts, &pool)
            }
        };
        r.map_err(OpError::from).map_err(|e| OpError { code: e.code, msg: format!("{label}: {}", e.msg) })
    }
}

/// Allocates output `index` with `dims` and returns its data, checked to have A's element type
/// `elem`; None (allocated, not inspected) when it is `empty`.
///
/// # Safety
/// `ctx` is the live context of the running node.
unsafe fn output(
    api: Api,
    ctx: *mut OrtKernelContext,
    index: usize,
    dims: &[i64],
    elem: i32,
    empty: bool,
) -> Result<Option<*mut u8>, String> {
    let mut y_val: *mut OrtValue = std::ptr::null_mut();
    // SAFETY (all calls): `ctx` is live; `y_val` is the value just allocated.
    api::check(api, unsafe { (api.0.KernelContext_GetOutput)(ctx, index, dims.as_ptr(), dims.len(), &mut y_val) })?;
    if empty {
        return Ok(None);
    }
    let y_elem = unsafe { api::value_shape(api, y_val) }?.elem;
    if y_elem != elem {
        return Err(format!(
            "output {index} was allocated as {} for input A of type {} (shape inference did not run?)",
            api::elem_name(y_elem),
            api::elem_name(elem)
        ));
    }
    Ok(Some(unsafe { api::value_data(api, y_val) }?))
}

/// The shape of `Add(a, b)` under ONNX's (numpy's) broadcasting, or None if they do not broadcast.
fn broadcast_dims(a: &[i64], b: &[i64]) -> Option<Vec<i64>> {
    let rank = a.len().max(b.len());
    let at = |d: &[i64], i: usize| if i + d.len() >= rank { d[i + d.len() - rank] } else { 1 };
    (0..rank)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

/// `y = T(p + r)` over `y_dims`, with `p` (`p_dims`) and `r` (`r_dims`) broadcast to it
/// (`y_dims = broadcast_dims(p_dims, r_dims)`, at least one element).
fn broadcast_add<T: Element>(p: &[f32], p_dims: &[i64], r: &[T], r_dims: &[i64], y: &mut [T], y_dims: &[i64]) {
    let rank = y_dims.len();
    // Strides over y's dimensions (0 along a broadcast one).
    let strides = |dims: &[i64]| {
        let mut st = vec![0usize; rank];
        let off = rank - dims.len();
        let mut acc = 1usize;
        for i in (0..dims.len()).rev() {
            st[off + i] = if dims[i] == 1 { 0 } else { acc };
            acc *= dims[i] as usize;
        }
        st
    };
    let (sp, sr) = (strides(p_dims), strides(r_dims));
    let last = rank - 1;
    let inner = y_dims[last] as usize;
    let mut idx = vec![0usize; rank];
    let (mut op, mut or) = (0usize, 0usize);
    for row in y.chunks_exact_mut(inner) {
        for (j, v) in row.iter_mut().enumerate() {
            *v = T::from_f32(p[op + j * sp[last]] + r[or + j * sr[last]].to_f32());
        }
        // The next row: an odometer over the outer dimensions.
        for d in (0..last).rev() {
            idx[d] += 1;
            op += sp[d];
            or += sr[d];
            if idx[d] < y_dims[d] as usize {
                break;
            }
            op -= sp[d] * idx[d];
            or -= sr[d] * idx[d];
            idx[d] = 0;
        }
    }
}

/// ONNX Runtime's intra-op thread pool (`KernelContext_ParallelFor`) as the executor of the
/// GEMM's parallel parts: the activation quantization and the blocks of output tiles (the same
/// work split as dynq's own pool, so per-row and per-tensor activations, small M and large M
/// all use every thread of the session, and dynq starts no threads inside a session).
struct OrtPool<'a> {
    api: Api,
    ctx: *mut OrtKernelContext,
    probe: &'a PoolProbe,
    label: &'a str,
}

// SAFETY: only `run` touches `ctx`, from the thread that runs the node (the GEMM driver calls
// it from its calling thread); the tasks themselves never see the pool.
unsafe impl Sync for OrtPool<'_> {}

/// What the tasks of one `ParallelFor` share.
struct ForContext<'a> {
    task: &'a (dyn Fn(usize) + Sync),
    panic: Mutex<Option<String>>,
    /// The thread that called `ParallelFor`, and whether a task ran on another one.
    caller: std::thread::ThreadId,
    foreign: AtomicBool,
}

unsafe extern "C" fn run_task_trampoline(data: *mut c_void, index: usize) {
    // SAFETY: `data` is the `ForContext` passed to ParallelFor, alive until it returns.
    let c = unsafe { &*(data as *const ForContext<'_>) };
    if std::thread::current().id() != c.caller {
        c.foreign.store(true, Ordering::Relaxed);
    }
    // A panic must not unwind into ONNX Runtime's C++ frames: catch it and report it after.
    if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (c.task)(index))) {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        c.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(what);
    }
}

impl Parallel for OrtPool<'_> {
    fn workers(&self) -> usize {
        // The C API does not tell a kernel its pool size: split the work for every core, unless
        // the pool has shown itself single-threaded (see PoolProbe).
        if self.probe.inline() {
            return 1;
        }
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }

    fn run(&self, _max_workers: usize, tasks: usize, task: &(dyn Fn(usize) + Sync)) -> crate::Result<()> {
        let c = ForContext {
            task,
            panic: Mutex::new(None),
            caller: std::thread::current().id(),
            foreign: AtomicBool::new(false),
        };
        // SAFETY: `ctx` is the live context of the running node; `c` outlives the call, which
        // returns after every task has finished.
        let st = unsafe {
            (self.api.0.KernelContext_ParallelFor)(
                self.ctx,
                run_task_trampoline,
                tasks,
                0,
                &c as *const ForContext<'_> as *mut c_void,
            )
        };
        api::check(self.api, st).map_err(Error::Internal)?;
        self.probe.record(c.foreign.load(Ordering::Relaxed), self.label);
        match c.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(what) => Err(Error::Internal(format!("caught a panic inside dynq: {what} (please report)"))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calls of a node that the probe sends through the pool, out of `calls`, while every
    /// task runs on the caller.
    fn probed(p: &PoolProbe, calls: usize) -> Vec<usize> {
        (0..calls)
            .filter(|_| {
                let pooled = !p.inline();
                if pooled {
                    p.record(false, "t");
                }
                pooled
            })
            .collect()
    }

    #[test]
    fn pool_probe_backs_off_and_finds_workers_again() {
        let p = PoolProbe::default();
        let seen = probed(&p, 400);
        // 8 calls to learn, then probes after gaps of 8, 16, 32 and then 64 inline calls.
        let mut want: Vec<usize> = (0..8).collect();
        let mut at = 8;
        for gap in [8, 16, 32, 64, 64, 64, 64, 64] {
            at += gap;
            want.push(at);
            at += 1;
        }
        want.retain(|&c| c < 400);
        assert_eq!(seen, want);
        // A probe that sees a worker ends inline running for good.
        while p.inline() {}
        p.record(true, "t");
        assert!((0..1000).all(|_| !p.inline()));

        // A pool that shows a worker before the probe decides never goes inline.
        let p = PoolProbe::default();
        p.record(false, "t");
        p.record(true, "t");
        for _ in 0..20 {
            p.record(false, "t");
        }
        assert!(!p.inline());
    }

    #[test]
    fn broadcast_add_equals_numpy_rules() {
        assert_eq!(broadcast_dims(&[2, 3, 4], &[2, 3, 4]), Some(vec![2, 3, 4]));
        assert_eq!(broadcast_dims(&[2, 3, 4], &[1, 3, 4]), Some(vec![2, 3, 4]));
        assert_eq!(broadcast_dims(&[1, 3, 4], &[5, 1, 4]), Some(vec![5, 3, 4]));
        assert_eq!(broadcast_dims(&[3, 4], &[2, 1, 1]), Some(vec![2, 3, 4]));
        assert_eq!(broadcast_dims(&[1, 3, 4], &[0, 3, 1]), Some(vec![0, 3, 4]));
        assert_eq!(broadcast_dims(&[2, 3, 4], &[3, 3, 4]), None);
        assert_eq!(broadcast_dims(&[2, 3, 4], &[5]), None);
        // Every pair of shapes from these dims (p always ends in 4, as a product's N does).
        let shapes: Vec<Vec<i64>> =
            vec![vec![4], vec![1], vec![2, 4], vec![3, 1], vec![2, 3, 4], vec![1, 3, 4], vec![2, 1, 1], vec![1, 1, 4]];
        for p_dims in shapes.iter().filter(|d| d.last() == Some(&4)) {
            for r_dims in &shapes {
                let Some(y_dims) = broadcast_dims(p_dims, r_dims) else { continue };
                let len = |d: &[i64]| d.iter().product::<i64>() as usize;
                let p: Vec<f32> = (0..len(p_dims)).map(|i| i as f32 * 0.5).collect();
                let r: Vec<f32> = (0..len(r_dims)).map(|i| 100.0 + i as f32).collect();
                let mut y = vec![f32::NAN; len(&y_dims)];
                broadcast_add(&p, p_dims, &r, r_dims, &mut y, &y_dims);
                // The definition: right-aligned indices, a size-1 dimension always at 0.
                let rank = y_dims.len();
                let flat = |d: &[i64], idx: &[usize]| {
                    let off = rank - d.len();
                    d.iter()
                        .enumerate()
                        .fold(0usize, |f, (i, &n)| f * n as usize + if n == 1 { 0 } else { idx[off + i] })
                };
                for (e, &v) in y.iter().enumerate() {
                    let mut idx = vec![0usize; rank];
                    let mut rest = e;
                    for i in (0..rank).rev() {
                        idx[i] = rest % y_dims[i] as usize;
                        rest /= y_dims[i] as usize;
                    }
                    let want = p[flat(p_dims, &idx)] + r[flat(r_dims, &idx)];
                    assert_eq!(v, want, "{p_dims:?} + {r_dims:?} -> {y_dims:?} at {idx:?}");
                }
            }
        }
    }

    #[test]
    fn attrs_defaults_and_errors() {
        let none = |_: &str| Ok(None);
        let a = parse_attrs(none).unwrap();
        assert_eq!(a.act_granularity, ActGranularity::PerRow);
        assert_eq!(a.act_type, ActType::AsymmetricU8);
        assert_eq!(a.activation, Activation::None);
        let a = parse_attrs(|n: &str| Ok((n == "activation").then(|| "gelu".to_string()))).unwrap();
        assert_eq!(a.activation, Activation::Gelu);
        let a = parse_attrs(|n: &str| Ok((n == "activation").then(|| "gelu_tanh".to_string()))).unwrap();
        assert_eq!(a.activation, Activation::GeluTanh);
        for (name, act) in [("silu", Activation::Silu), ("quick_gelu", Activation::QuickGelu)] {
            let a = parse_attrs(|n: &str| Ok((n == "activation").then(|| name.to_string()))).unwrap();
            assert_eq!(a.activation, act);
        }
        let e = parse_attrs(|n: &str| Ok((n == "act_type").then(|| "int4".to_string()))).unwrap_err();
        assert!(e.contains("'act_type'") && e.contains("\"int4\"") && e.contains("\"symmetric_i8\""), "{e}");
    }
}
