//! ONNX Runtime custom-op library: `libdynq.so` exports `RegisterCustomOps`, so
//! `SessionOptions.register_custom_ops_library("libdynq.so")` (Python) or
//! `RegisterCustomOpsLibrary` (C, C++, C#) adds the op `DynQMatMul` in the domain `dynq`.
//!
//! ## The op `dynq.DynQMatMul` (since version 1)
//!
//! `Y = act(dequant(quant(A) x W) + bias)`, activations quantized in every call.
//!
//! | input | type | shape | |
//! |---|---|---|---|
//! | A | float or float16 | `[..., K]`, any rank >= 1 | activations |
//! | W | int8 | `[K, N]` (ONNX MatMul layout) | weight, `W_real = scale * W` |
//! | scales | float | `[N]` (per output channel) or `[1]` / scalar (per tensor) | weight scales |
//! | bias | float | `[N]` | optional |
//! | smooth | float | `[K]` | optional: per-input-channel smoothing factors (below) |
//! | residual | A's type | Y's shape, or one that broadcasts with it | optional: added after the activation |
//! | ln_scale | float | `[N]` | optional: layer norm of each output row, last (below) |
//! | ln_bias | float | `[N]` | optional, with `ln_scale` |
//!
//! Output `Y`: `[..., N]` of A's element type (shape inference provides both). float16 inputs
//! are widened exactly and outputs rounded to nearest-even from dynq's f32 epilogue.
//!
//! Attributes (strings, all optional):
//! - `act_granularity`: `"per_row"` (default; one range per row of A, i.e. per token) or
//!   `"per_tensor"` (one range for all of A, as ONNX `DynamicQuantizeLinear`).
//! - `act_type`: `"asymmetric_u8"` (default; uint8 with zero point) or `"symmetric_i8"`.
//! - `activation`: `"none"` (default), `"relu"`, `"gelu"` (erf form), `"gelu_tanh"` (tanh
//!   form), `"silu"` or `"quick_gelu"`, fused into the GEMM's epilogue after the bias (dynq's
//!   `Epilogue`).
//!
//! - `a_layout`: `"rows"` (default) or `"heads"`: A is `[batch, heads, seq, d]` (the attention
//!   context) and the product reads it as its `Transpose(perm = [0, 2, 1, 3])` reshaped to
//!   `[batch, seq, heads * d]` (K = heads * d); Y is `[batch, seq, N]`. The same bits as the
//!   node on the transposed copy, without the copy. Not with `split` or `heads`.
//!
//! Float attribute (optional): `ln_epsilon` (default 1e-5), the layer norm's epsilon.
//!
//! With `ln_scale`, `Y = LayerNorm(act(A W + bias) + residual)` over the last axis: ONNX
//! `LayerNormalization` (axis -1, computed in f32) of the sum, with the operations and order
//! `crate::gemm::LayerNorm` defines (bit-identical on every ISA and thread count; within float
//! rounding of ONNX Runtime's kernel). Rows are normalized while they are still in cache, which
//! spares the separate node's pass over the output (the converter folds a `LayerNormalization`
//! that follows a folded residual `Add`: post-LN blocks such as BERT's). Not with `split` or
//! `heads`; a residual that broadcasts the output's last axis beyond N is refused.
//!
//! Integer-list attributes (optional):
//! - `split`: the widths of several outputs (columns of the product, in order; they add up to N).
//! - `heads` (one count per output, 0 = plain) and `heads_transposed` (one 0 or 1 per output):
//!   for A `[batch, seq, K]`, the output is written split into attention heads,
//!   `[batch, heads, seq, width / heads]` or, transposed, `[batch, heads, width / heads, seq]`
//!   (the `Transpose` with `perm = [0, 2, 1, 3]` or `[0, 2, 3, 1]` of its
//!   `[batch, seq, heads, width / heads]` reshape), with the same bits as the plain output.
//!
//! `smooth` (optional, positive finite): row `i` of A is quantized as `A[i, k] * smooth[k]`. A
//! converter that multiplied row `k` of the float weight by `1 / smooth[k]` before quantizing it
//! computes the same product with activation channels of very different ranges brought closer
//! together (SmoothQuant); `python -m dynq.onnx quantize` does this where it measures a gain.
//! Give a bias (zeros if there is none) rather than an empty input name before `smooth`: ONNX
//! Runtime 1.17 to 1.21 (at least) crash creating a session whose custom-op node leaves a middle
//! input empty (1.31 accepts it).
//!
//! Weights that are constant initializers are packed once, when ONNX Runtime creates the kernel,
//! through a process-wide cache keyed by content: every session of the same model shares one
//! packed copy (reference-counted; freed with the last session). A weight that is not a constant
//! (a graph input, or an initializer that is also listed as a graph input and so may be
//! overridden) is packed at every call: correct, but slow.
//!
//! The product runs on ONNX Runtime's intra-op thread pool (`KernelContext_ParallelFor`): the
//! activation quantization (by rows) and then the output tiles (in blocks of rows and columns, so
//! that decoding shapes with M = 1 use every thread too), with the same work split as dynq's own
//! pool; dynq never starts threads of its own inside a session, and results are bit-identical
//! for any thread count, in both activation modes. The C API does not tell a kernel how many
//! threads its pool has: a node whose `ParallelFor` calls keep running every task on the calling
//! thread (a single-threaded session) stops calling it after a few runs, which saves tens of
//! microseconds per node and run (see `kernel::PoolProbe`). `DYNQ_ORT_VERBOSE=1` prints how each weight
//! was packed or shared.
//!
//! Bad models (wrong types or ranks, a K mismatch, bad attributes, NaN or infinite activations)
//! give an ONNX Runtime error status naming the node, never a crash.
//!
//! Compiled against C API version 17: runs on ONNX Runtime 1.17 and later (tested: 1.17.3 and
//! 1.31.1). Older versions are refused with a clear message when the library is registered.
//!
//! The op and domain objects live for the whole process (ONNX Runtime requires them to outlive
//! every session that uses them); one small domain object is kept per registration. Registering
//! the library again with the same session options does nothing (the options are marked with the
//! config entry `dynq.custom_ops_registered`). Each ONNX Runtime build in the process (a Python
//! module and a C++ library may bring two) gets op descriptors that carry its own API table.

pub mod api;
pub mod cache;
pub mod kernel;

use api::Api;
use kernel::{
    DynqKernel, OpError, IN_A, IN_BIAS, IN_LN_BIAS, IN_LN_SCALE, IN_RESIDUAL, IN_SCALES, IN_SMOOTH, IN_W, MAX_INPUTS,
};

/// What the input list may be, for messages.
pub(crate) const INPUTS_EXPECTED: &str =
    "3 to 8 inputs (A, W, scales[, bias[, smooth[, residual[, ln_scale[, ln_bias]]]]])";
use ort_sys::{
    ONNXTensorElementDataType, OrtApi, OrtApiBase, OrtCustomOp, OrtCustomOpDomain,
    OrtCustomOpInputOutputCharacteristic, OrtErrorCode, OrtKernelContext, OrtKernelInfo, OrtMemType, OrtSessionOptions,
    OrtShapeInferContext, OrtStatus, OrtStatusPtr, OrtTensorTypeAndShapeInfo,
};
use std::ffi::{c_char, c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The C API version this library is compiled against (`OrtCustomOp.version`, `GetApi`).
pub const ORT_API_VERSION: u32 = 17;
/// The op's domain.
pub const DOMAIN: &std::ffi::CStr = c"dynq";
/// The op's name.
pub const OP_NAME: &std::ffi::CStr = c"DynQMatMul";

/// Session config key that marks options the library has already been registered with:
/// registering twice would add the `dynq` domain twice, and ONNX Runtime then refuses every
/// session ("Domain already set in registry").
const REGISTERED_KEY: &std::ffi::CStr = c"dynq.custom_ops_registered";

/// Runs `f`, turning an error or a panic into an ONNX Runtime status.
fn guarded(api: &OrtApi, f: impl FnOnce() -> Result<(), OpError>) -> OrtStatusPtr {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => OrtStatusPtr(ptr::null_mut()),
        Ok(Err(e)) => OrtStatusPtr(api::make_status(api, e.code, &e.msg)),
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            OrtStatusPtr(api::make_status(
                api,
                OrtErrorCode::ORT_FAIL,
                &format!("DynQMatMul: caught a panic inside dynq: {what} (please report)"),
            ))
        }
    }
}

unsafe extern "system" fn get_name(_op: *const OrtCustomOp) -> *const c_char {
    OP_NAME.as_ptr()
}

unsafe extern "system" fn get_ep(_op: *const OrtCustomOp) -> *const c_char {
    c"CPUExecutionProvider".as_ptr()
}

// Every input is declared with an undefined ("any") element type so that a wrong type reaches
// our checks and gets a message that says what is expected, instead of a failed kernel lookup.
unsafe extern "system" fn get_input_type(_op: *const OrtCustomOp, _index: usize) -> ONNXTensorElementDataType {
    ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED
}

unsafe extern "system" fn get_input_count(_op: *const OrtCustomOp) -> usize {
    MAX_INPUTS
}

// The output has A's element type: the op is registered twice under the same name, with a
// float and a float16 output (ONNX Runtime merges them into one schema whose output may be either,
// and picks the kernel whose output type matches what shape inference gave: A's type). A single
// registration with an undefined output type would need exactly one undefined input type, and
// the inputs are undefined so that wrong types reach `infer`'s messages.
unsafe extern "system" fn get_output_type(_op: *const OrtCustomOp, _index: usize) -> ONNXTensorElementDataType {
    ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
}

unsafe extern "system" fn get_output_type_f16(_op: *const OrtCustomOp, _index: usize) -> ONNXTensorElementDataType {
    ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16
}

unsafe extern "system" fn get_output_count(_op: *const OrtCustomOp) -> usize {
    1
}

unsafe extern "system" fn get_input_characteristic(
    _op: *const OrtCustomOp,
    index: usize,
) -> OrtCustomOpInputOutputCharacteristic {
    if index == IN_BIAS || index == IN_SMOOTH || index == IN_RESIDUAL || index == IN_LN_SCALE || index == IN_LN_BIAS {
        OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
    } else {
        OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED
    }
}

// One output, or several with the `split` attribute: a variadic output of one element type
// (homogeneous), A's.
unsafe extern "system" fn get_output_characteristic(
    _op: *const OrtCustomOp,
    _index: usize,
) -> OrtCustomOpInputOutputCharacteristic {
    OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_VARIADIC
}

unsafe extern "system" fn get_input_memory_type(_op: *const OrtCustomOp, _index: usize) -> OrtMemType {
    OrtMemType::OrtMemTypeDefault
}

unsafe extern "system" fn variadic_min_arity(_op: *const OrtCustomOp) -> c_int {
    1
}

unsafe extern "system" fn variadic_homogeneity(_op: *const OrtCustomOp) -> c_int {
    0
}

unsafe extern "system" fn variadic_output_homogeneity(_op: *const OrtCustomOp) -> c_int {
    1
}

unsafe extern "system" fn start_version(_op: *const OrtCustomOp) -> c_int {
    1
}

unsafe extern "system" fn end_version(_op: *const OrtCustomOp) -> c_int {
    c_int::MAX
}

unsafe extern "system" fn create_kernel_v2(
    _op: *const OrtCustomOp,
    api: *const OrtApi,
    info: *const OrtKernelInfo,
    kernel: *mut *mut c_void,
) -> OrtStatusPtr {
    // SAFETY: ONNX Runtime passes its live API table, valid for the process.
    let api: &'static OrtApi = unsafe { &*api };
    guarded(api, || {
        if kernel.is_null() {
            return Err(OpError::fail("DynQMatMul: ONNX Runtime passed no kernel slot".into()));
        }
        // SAFETY: `info` is live during this call.
        let k = unsafe { DynqKernel::create(Api(api), info) }?;
        // SAFETY: `kernel` is a writable slot; ONNX Runtime hands the pointer back to compute and destroy.
        unsafe { *kernel = Box::into_raw(Box::new(k)).cast() };
        Ok(())
    })
}

unsafe extern "system" fn kernel_compute_v2(op_kernel: *mut c_void, ctx: *mut OrtKernelContext) -> OrtStatusPtr {
    // SAFETY: `op_kernel` is a kernel made by `create_kernel_v2`, not yet destroyed.
    let k = unsafe { &*(op_kernel as *const DynqKernel) };
    let api = k.api;
    // SAFETY: `ctx` is live during this call.
    guarded(api.0, || unsafe { k.compute(ctx) })
}

unsafe extern "system" fn kernel_destroy(op_kernel: *mut c_void) {
    if !op_kernel.is_null() {
        // SAFETY: made by Box::into_raw in `create_kernel_v2`; ONNX Runtime destroys it once.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            drop(unsafe { Box::from_raw(op_kernel as *mut DynqKernel) })
        }));
    }
}

/// Type and shape of one input in shape inference (owned by the context: not released).
struct InferInput {
    shape: api::TensorShape,
    symbols: Vec<*const c_char>,
}

/// # Safety
/// `ctx` is a live shape-inference context.
unsafe fn infer_input(api: Api, ctx: *mut OrtShapeInferContext, index: usize) -> Result<InferInput, String> {
    let mut info: *mut OrtTensorTypeAndShapeInfo = ptr::null_mut();
    // SAFETY: `ctx` live; the returned info is owned by the context (releasing it double-frees).
    unsafe { api::check(api, (api.0.ShapeInferContext_GetInputTypeShape)(ctx, index, &mut info))? };
    if info.is_null() {
        return Err(format!("no type information for input {index}"));
    }
    // SAFETY: `info` is live.
    let shape = unsafe { api::read_shape_info(api, info)? };
    let mut symbols = vec![ptr::null::<c_char>(); shape.dims.len()];
    if !symbols.is_empty() {
        // SAFETY: `symbols` has one slot per dimension; the strings are owned by `info`.
        unsafe { api::check(api, (api.0.GetSymbolicDimensions)(info, symbols.as_mut_ptr(), symbols.len()))? };
    }
    Ok(InferInput { shape, symbols })
}

/// The shape of `Add(p, r)` from two inferred shapes (a dimension is its value, or -1 with or
/// without a symbol): per dimension, right-aligned, the same value or symbol, the other one
/// where one is 1, and unknown (-1, no symbol) where it cannot be told; an error where known
/// sizes cannot broadcast.
fn broadcast_shape(
    (pd, ps): (&[i64], &[*const c_char]),
    (rd, rs): (&[i64], &[*const c_char]),
) -> Result<(Vec<i64>, Vec<*const c_char>), String> {
    let rank = pd.len().max(rd.len());
    let at = |d: &[i64], s: &[*const c_char], i: usize| {
        (i + d.len() >= rank).then(|| (d[i + d.len() - rank], s[i + d.len() - rank]))
    };
    let named = |s: *const c_char| {
        // SAFETY: non-null symbols are NUL-terminated strings owned by the input infos.
        (!s.is_null() && unsafe { *s } != 0).then(|| unsafe { std::ffi::CStr::from_ptr(s) })
    };
    let mut out = (Vec::with_capacity(rank), Vec::with_capacity(rank));
    for i in 0..rank {
        let (d, s) = match (at(pd, ps, i), at(rd, rs, i)) {
            (Some(p), None) | (None, Some(p)) => p,
            (Some(p), Some(r)) => {
                if p.0 >= 0 && p.0 == r.0 || r.0 == 1 {
                    p
                } else if p.0 == 1 {
                    r
                } else if p.0 >= 0 && r.0 >= 0 {
                    return Err(format!("residual of shape {rd:?} does not broadcast with the product's shape {pd:?}"));
                } else if p.0 < 0 && r.0 < 0 && named(p.1).is_some() && named(p.1) == named(r.1) {
                    p
                } else {
                    (-1, ptr::null())
                }
            }
            (None, None) => unreachable!("i < rank"),
        };
        out.0.push(d);
        out.1.push(s);
    }
    Ok(out)
}

/// Checks the input types and computes the output shape `[..., N]`.
///
/// # Safety
/// `ctx` is a live shape-inference context.
unsafe fn infer(api: Api, ctx: *mut OrtShapeInferContext) -> Result<(), String> {
    let mut count = 0usize;
    // SAFETY: `ctx` is live (all calls below).
    unsafe { api::check(api, (api.0.ShapeInferContext_GetInputCount)(ctx, &mut count))? };
    if !(3..=MAX_INPUTS).contains(&count) {
        return Err(format!("expects {INPUTS_EXPECTED}, got {count}"));
    }
    let a = unsafe { infer_input(api, ctx, IN_A)? };
    let w = unsafe { infer_input(api, ctx, IN_W)? };
    let s = unsafe { infer_input(api, ctx, IN_SCALES)? };
    if a.shape.elem != api::ELEM_FLOAT && a.shape.elem != api::ELEM_FLOAT16 {
        return Err(format!("input A must be float or float16, got {}", api::elem_name(a.shape.elem)));
    }
    if w.shape.elem != api::ELEM_INT8 {
        return Err(format!(
            "weight W must be int8, got {}{}",
            api::elem_name(w.shape.elem),
            if w.shape.elem == api::ELEM_UINT8 {
                " (convert uint8 weights with: python -m dynq.onnx quantize in.onnx out.onnx)"
            } else {
                ""
            }
        ));
    }
    if s.shape.elem != api::ELEM_FLOAT {
        return Err(format!("weight scales must be float, got {}", api::elem_name(s.shape.elem)));
    }
    for (index, what) in [
        (IN_BIAS, "bias"),
        (IN_SMOOTH, "smoothing factors"),
        (IN_LN_SCALE, "layer norm scale"),
        (IN_LN_BIAS, "layer norm bias"),
    ] {
        if index < count {
            let b = unsafe { infer_input(api, ctx, index)? };
            // An absent optional input reports an undefined type.
            if b.shape.elem != 0 && b.shape.elem != api::ELEM_FLOAT {
                return Err(format!("{what} must be float, got {}", api::elem_name(b.shape.elem)));
            }
        }
    }
    let residual = if IN_RESIDUAL < count {
        let r = unsafe { infer_input(api, ctx, IN_RESIDUAL)? };
        if r.shape.elem != 0 && r.shape.elem != a.shape.elem {
            return Err(format!(
                "residual must have A's type ({}), got {}",
                api::elem_name(a.shape.elem),
                api::elem_name(r.shape.elem)
            ));
        }
        // Rank 0: absent, a scalar or unknown; the product's shape is kept.
        (r.shape.elem != 0 && !r.shape.dims.is_empty()).then_some(r)
    } else {
        None
    };
    let split = unsafe { infer_split(api, ctx)? };
    let outputs = split.as_ref().map_or(1, |v| v.len());
    // Rank 0 means a scalar or an unknown shape here: then only the output type is known.
    if w.shape.dims.is_empty() || a.shape.dims.is_empty() {
        for g in 0..outputs {
            unsafe { set_output(api, ctx, g, a.shape.elem, None)? };
        }
        return Ok(());
    }
    if w.shape.dims.len() != 2 {
        return Err(format!("weight W must have rank 2 ([K, N]), got shape {:?}", w.shape.dims));
    }
    // a_layout = "heads": A is [batch, heads, seq, d], read as [batch, seq, heads * d].
    let a_heads = unsafe { infer_string(api, ctx, c"a_layout")? }.is_some_and(|v| v == "heads");
    if a_heads && a.shape.dims.len() != 4 {
        return Err(format!(
            "attribute a_layout = \"heads\" needs A of rank 4 ([batch, heads, seq, d]), got shape {:?}",
            a.shape.dims
        ));
    }
    let ka = match a_heads {
        true if a.shape.dims[1] >= 0 && a.shape.dims[3] >= 0 => a.shape.dims[1] * a.shape.dims[3],
        true => -1,
        false => *a.shape.dims.last().expect("rank >= 1"),
    };
    let kw = w.shape.dims[0];
    if ka >= 0 && kw >= 0 && ka != kw {
        return Err(format!("input A has K = {ka} (shape {:?}) but W is [{kw}, {}]", a.shape.dims, w.shape.dims[1]));
    }
    let (mut dims, mut symbols) = match a_heads {
        true => (vec![a.shape.dims[0], a.shape.dims[2], ka], vec![a.symbols[0], a.symbols[2], ptr::null()]),
        false => (a.shape.dims.clone(), a.symbols.clone()),
    };
    *dims.last_mut().expect("rank >= 1") = w.shape.dims[1];
    *symbols.last_mut().expect("rank >= 1") = w.symbols[1];
    let heads = unsafe { infer_heads(api, ctx, outputs)? };
    let with_heads = heads.iter().any(|&(h, _)| h > 0);
    if with_heads && dims.len() != 3 {
        return Err(format!("attribute 'heads' needs A of rank 3 ([batch, seq, K]), got shape {:?}", a.shape.dims));
    }
    if let (Some(r), None, false) = (&residual, &split, with_heads) {
        // The residual broadcasts with the product as ONNX's Add does (see the kernel); not with
        // heads, which the kernel refuses.
        (dims, symbols) = broadcast_shape((&dims, &symbols), (&r.shape.dims, &r.symbols))?;
    }
    // ONNX Runtime records a dimension without a symbol as its value, so an unknown (-1) dimension
    // without a name would become a literal -1 (and break Reshape targets computed from Shape).
    // Unknown dimensions without a symbol get a fresh unique symbol instead.
    static UNKNOWN: AtomicUsize = AtomicUsize::new(0);
    let mut owned: Vec<std::ffi::CString> = Vec::new();
    let empty = c"".as_ptr();
    for (d, s) in dims.iter().zip(symbols.iter_mut()) {
        // SAFETY: non-null symbols are NUL-terminated strings owned by the input infos.
        let named = !s.is_null() && unsafe { *(*s) } != 0;
        if *d < 0 && !named {
            let id = UNKNOWN.fetch_add(1, Ordering::Relaxed);
            owned.push(std::ffi::CString::new(format!("dynq_unk_{id}")).expect("no NUL"));
            *s = owned.last().expect("just pushed").as_ptr();
        } else if s.is_null() || *d >= 0 {
            *s = empty;
        }
    }
    let widths = match split {
        None => vec![*dims.last().expect("rank >= 1")],
        Some(widths) => {
            if w.shape.dims[1] >= 0 && widths.iter().sum::<i64>() != w.shape.dims[1] {
                return Err(format!(
                    "attribute 'split' {widths:?} must add up to the weight's N = {}",
                    w.shape.dims[1]
                ));
            }
            let last = dims.len() - 1;
            symbols[last] = empty;
            widths
        }
    };
    for (g, (&c, &(h, transposed))) in widths.iter().zip(&heads).enumerate() {
        if h == 0 {
            *dims.last_mut().expect("rank >= 1") = c;
            unsafe { set_output(api, ctx, g, a.shape.elem, Some((&dims, &mut symbols)))? };
            continue;
        }
        let h = h as i64;
        if c >= 0 && c % h != 0 {
            return Err(format!("output {g} has {c} columns, which do not split into {h} heads (attribute 'heads')"));
        }
        // [batch, heads, seq, d] or [batch, heads, d, seq].
        let d = if c >= 0 { c / h } else { -1 };
        let (mut hd, mut hs) = ([dims[0], h, dims[1], d], [symbols[0], empty, symbols[1], empty]);
        if transposed {
            hd.swap(2, 3);
            hs.swap(2, 3);
        }
        if d < 0 {
            // An unknown width gives an unknown head size: a fresh symbol, as above.
            let id = UNKNOWN.fetch_add(1, Ordering::Relaxed);
            owned.push(std::ffi::CString::new(format!("dynq_unk_{id}")).expect("no NUL"));
            hs[if transposed { 2 } else { 3 }] = owned.last().expect("just pushed").as_ptr();
        }
        unsafe { set_output(api, ctx, g, a.shape.elem, Some((&hd, &mut hs)))? };
    }
    Ok(())
}

/// The `heads` and `heads_transposed` attributes, one `(heads, transposed)` per output
/// (`(0, false)`: the plain layout), checked as the kernel checks them.
///
/// # Safety
/// `ctx` is a live shape-inference context.
unsafe fn infer_heads(api: Api, ctx: *mut OrtShapeInferContext, outputs: usize) -> Result<Vec<(usize, bool)>, String> {
    let heads = unsafe { infer_ints(api, ctx, c"heads")? };
    let transposed = unsafe { infer_ints(api, ctx, c"heads_transposed")? };
    kernel::parse_heads(heads, transposed, outputs)
}

/// The `split` attribute (output widths) if the node has one.
///
/// # Safety
/// `ctx` is a live shape-inference context.
unsafe fn infer_split(api: Api, ctx: *mut OrtShapeInferContext) -> Result<Option<Vec<i64>>, String> {
    let Some(v) = (unsafe { infer_ints(api, ctx, c"split")? }) else { return Ok(None) };
    if v.is_empty() || v.iter().any(|&c| c <= 0) {
        return Err(format!("attribute 'split' must hold positive widths, got {v:?}"));
    }
    Ok(Some(v))
}

/// A list-of-integers attribute, if the node has it.
///
/// # Safety
/// `ctx` is a live shape-inference context.
unsafe fn infer_ints(
    api: Api,
    ctx: *mut OrtShapeInferContext,
    name: &std::ffi::CStr,
) -> Result<Option<Vec<i64>>, String> {
    let mut attr: *const ort_sys::OrtOpAttr = ptr::null();
    // SAFETY: `ctx` is live; an absent attribute gives NULL (or an error status on some versions).
    let st = unsafe { (api.0.ShapeInferContext_GetAttribute)(ctx, name.as_ptr(), &mut attr) };
    if api::check(api, st).is_err() || attr.is_null() {
        return Ok(None);
    }
    let what = name.to_string_lossy();
    let mut len: usize = 0;
    // SAFETY: `attr` is live; a zero-length read asks for the size in bytes.
    let _ = api::check(api, unsafe {
        (api.0.ReadOpAttr)(attr, ort_sys::OrtOpAttrType::ORT_OP_ATTR_INTS, ptr::null_mut(), 0, &mut len)
    });
    let mut v = vec![0i64; len / 8];
    if !v.is_empty() {
        // SAFETY: `v` has `len` bytes.
        api::check(api, unsafe {
            (api.0.ReadOpAttr)(attr, ort_sys::OrtOpAttrType::ORT_OP_ATTR_INTS, v.as_mut_ptr().cast(), len, &mut len)
        })
        .map_err(|e| format!("attribute '{what}' must be a list of integers ({e})"))?;
    } else {
        // Nothing read as a list: a single integer is a mistake worth naming (as the kernel does).
        let mut i: i64 = 0;
        let mut got = 0usize;
        // SAFETY: `i` has 8 bytes.
        let st = unsafe {
            (api.0.ReadOpAttr)(attr, ort_sys::OrtOpAttrType::ORT_OP_ATTR_INT, (&mut i as *mut i64).cast(), 8, &mut got)
        };
        if api::check(api, st).is_ok() && got == 8 {
            return Err(format!("attribute '{what}' must be a list of integers, got the integer {i}"));
        }
    }
    Ok(Some(v))
}

/// A string attribute, if the node has it.
///
/// # Safety
/// `ctx` is a live shape-inference context.
unsafe fn infer_string(
    api: Api,
    ctx: *mut OrtShapeInferContext,
    name: &std::ffi::CStr,
) -> Result<Option<String>, String> {
    let mut attr: *const ort_sys::OrtOpAttr = ptr::null();
    // SAFETY: `ctx` is live; an absent attribute gives NULL (or an error status on some versions).
    let st = unsafe { (api.0.ShapeInferContext_GetAttribute)(ctx, name.as_ptr(), &mut attr) };
    if api::check(api, st).is_err() || attr.is_null() {
        return Ok(None);
    }
    let mut len: usize = 0;
    // SAFETY: `attr` is live; a zero-length read asks for the size in bytes.
    let _ = api::check(api, unsafe {
        (api.0.ReadOpAttr)(attr, ort_sys::OrtOpAttrType::ORT_OP_ATTR_STRING, ptr::null_mut(), 0, &mut len)
    });
    let mut v = vec![0u8; len];
    if len > 0 {
        // SAFETY: `v` has `len` bytes.
        api::check(api, unsafe {
            (api.0.ReadOpAttr)(attr, ort_sys::OrtOpAttrType::ORT_OP_ATTR_STRING, v.as_mut_ptr().cast(), len, &mut len)
        })
        .map_err(|e| format!("attribute '{}' must be a string ({e})", name.to_string_lossy()))?;
    }
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    Ok(Some(String::from_utf8_lossy(&v[..end]).into_owned()))
}

/// Sets the output's element type (A's: float or float16) and, when known, its shape.
///
/// # Safety
/// `ctx` is a live shape-inference context.
unsafe fn set_output(
    api: Api,
    ctx: *mut OrtShapeInferContext,
    index: usize,
    elem: i32,
    shape: Option<(&[i64], &mut [*const c_char])>,
) -> Result<(), String> {
    let ty = if elem == api::ELEM_FLOAT16 {
        ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16
    } else {
        ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
    };
    let mut out: *mut OrtTensorTypeAndShapeInfo = ptr::null_mut();
    // SAFETY: `ctx` is live; `out` is created here and released below.
    unsafe { api::check(api, (api.0.CreateTensorTypeAndShapeInfo)(&mut out))? };
    let r = (|| unsafe {
        api::check(api, (api.0.SetTensorElementType)(out, ty))?;
        if let Some((dims, symbols)) = shape {
            api::check(api, (api.0.SetDimensions)(out, dims.as_ptr(), dims.len()))?;
            api::check(api, (api.0.SetSymbolicDimensions)(out, symbols.as_mut_ptr(), symbols.len()))?;
        }
        api::check(api, (api.0.ShapeInferContext_SetOutputTypeShape)(ctx, index, out))
    })();
    unsafe { (api.0.ReleaseTensorTypeAndShapeInfo)(out) };
    r
}

unsafe extern "system" fn infer_output_shape(op: *const OrtCustomOp, ctx: *mut OrtShapeInferContext) -> OrtStatusPtr {
    if op.is_null() {
        return OrtStatusPtr(ptr::null_mut());
    }
    // SAFETY: every descriptor dynq registers is the first field of an `ApiOp` (see `ops_for`),
    // which lives for the process.
    let api = Api(unsafe { &*(*op.cast::<ApiOp>()).api });
    guarded(api.0, || {
        // SAFETY: `ctx` is live during this call.
        unsafe { infer(api, ctx) }.map_err(|m| OpError::invalid(format!("DynQMatMul: {m}")))
    })
}

/// An op descriptor and the API table of the ONNX Runtime it was registered with (shape
/// inference receives no API table, only the descriptor). `op` comes first: ONNX Runtime holds
/// a pointer to it, and reads only the fields of the C API version it declares.
#[repr(C)]
struct ApiOp {
    op: OrtCustomOp,
    api: *const OrtApi,
}
// SAFETY: immutable once made; ONNX Runtime only reads it, from any thread, and the API table
// it points to lives for the process.
unsafe impl Sync for ApiOp {}
unsafe impl Send for ApiOp {}

/// The two descriptors (float and float16 output) for the API table `api`: made once per
/// distinct table and kept for the process (ONNX Runtime requires them to outlive every
/// session). A process normally sees one table; two ONNX Runtime builds loaded at once (a
/// Python module and a C++ library, say) each get descriptors that point to their own.
fn ops_for(api: &'static OrtApi) -> &'static [ApiOp; 2] {
    static ALL: std::sync::Mutex<Vec<(usize, &'static [ApiOp; 2])>> = std::sync::Mutex::new(Vec::new());
    let mut all = ALL.lock().unwrap_or_else(|e| e.into_inner());
    let key = api as *const OrtApi as usize;
    if let Some((_, ops)) = all.iter().find(|(k, _)| *k == key) {
        return ops;
    }
    let ops: &'static [ApiOp; 2] =
        Box::leak(Box::new([ApiOp { op: op(get_output_type), api }, ApiOp { op: op(get_output_type_f16), api }]));
    all.push((key, ops));
    ops
}

/// The op descriptor with output type `output_type`.
const fn op(output_type: OutputTypeFn) -> OrtCustomOp {
    OrtCustomOp {
        version: ORT_API_VERSION,
        CreateKernel: None,
        GetName: Some(get_name),
        GetExecutionProviderType: Some(get_ep),
        GetInputType: Some(get_input_type),
        GetInputTypeCount: Some(get_input_count),
        GetOutputType: Some(output_type),
        GetOutputTypeCount: Some(get_output_count),
        KernelCompute: None,
        KernelDestroy: Some(kernel_destroy),
        GetInputCharacteristic: Some(get_input_characteristic),
        GetOutputCharacteristic: Some(get_output_characteristic),
        GetInputMemoryType: Some(get_input_memory_type),
        GetVariadicInputMinArity: Some(variadic_min_arity),
        GetVariadicInputHomogeneity: Some(variadic_homogeneity),
        GetVariadicOutputMinArity: Some(variadic_min_arity),
        GetVariadicOutputHomogeneity: Some(variadic_output_homogeneity),
        CreateKernelV2: Some(create_kernel_v2),
        KernelComputeV2: Some(kernel_compute_v2),
        InferOutputShapeFn: Some(infer_output_shape),
        GetStartVersion: Some(start_version),
        GetEndVersion: Some(end_version),
    }
}

type OutputTypeFn = unsafe extern "system" fn(*const OrtCustomOp, usize) -> ONNXTensorElementDataType;

/// # Safety
/// `api_base` and `options` are what ONNX Runtime passes to a custom-op library.
unsafe fn register(options: *mut OrtSessionOptions, api_base: *const OrtApiBase) -> *mut OrtStatus {
    if api_base.is_null() {
        return ptr::null_mut(); // cannot even report: nothing to create a status with
    }
    // SAFETY: `api_base` is ONNX Runtime's live API base.
    let base = unsafe { &*api_base };
    // SAFETY: GetApi returns NULL for a version the runtime does not serve.
    let p = unsafe { (base.GetApi)(ORT_API_VERSION) };
    if p.is_null() {
        // SAFETY: version 1 is served by every ONNX Runtime; the version string is static.
        let (v1, version) = unsafe { ((base.GetApi)(1), api::cstr((base.GetVersionString)())) };
        if v1.is_null() {
            return ptr::null_mut();
        }
        // SAFETY: `v1` is a live API table.
        return api::make_status(
            unsafe { &*v1 },
            OrtErrorCode::ORT_FAIL,
            &format!(
                "dynq needs ONNX Runtime 1.17 or later (C API version {ORT_API_VERSION}); this is ONNX Runtime {version}"
            ),
        );
    }
    // SAFETY: `p` is a live API table, valid for the process.
    let api: &'static OrtApi = unsafe { &*p };
    guarded(api, || {
        let a = Api(api);
        if options.is_null() {
            return Err(OpError::invalid("RegisterCustomOps: no session options".into()));
        }
        // Registered with these options already (twice from one program, or by two of its
        // layers): the domain is there; adding it again would make every session fail.
        let mut registered: c_int = 0;
        // SAFETY: `options` is live; the key is a NUL-terminated string.
        unsafe { api::check(a, (api.HasSessionConfigEntry)(options, REGISTERED_KEY.as_ptr(), &mut registered))? };
        if registered != 0 {
            return Ok(());
        }
        let ops = ops_for(api);
        let mut domain: *mut OrtCustomOpDomain = ptr::null_mut();
        // SAFETY: plain API calls; the domain is intentionally never released (it must outlive
        // every session created with these options, and ONNX Runtime does not tell us when that is).
        unsafe {
            api::check(a, (api.CreateCustomOpDomain)(DOMAIN.as_ptr(), &mut domain))?;
            api::check(a, (api.CustomOpDomain_Add)(domain, &ops[0].op))?;
            api::check(a, (api.CustomOpDomain_Add)(domain, &ops[1].op))?;
            api::check(a, (api.AddCustomOpDomain)(options, domain))?;
            api::check(a, (api.AddSessionConfigEntry)(options, REGISTERED_KEY.as_ptr(), c"1".as_ptr()))?;
        }
        Ok(())
    })
    .0
}

/// The entry point ONNX Runtime calls when the library is registered with a session's options.
///
/// # Safety
/// Called by ONNX Runtime with its session options and API base.
#[no_mangle]
pub unsafe extern "C" fn RegisterCustomOps(
    options: *mut OrtSessionOptions,
    api_base: *const OrtApiBase,
) -> *mut OrtStatus {
    // SAFETY: per the contract.
    std::panic::catch_unwind(|| unsafe { register(options, api_base) }).unwrap_or(ptr::null_mut())
}

/// Counters of the shared packed-weight cache of the ONNX Runtime op (diagnostics and tests):
/// packed weights alive, their heap bytes, lookups served from the cache, lookups that packed.
/// Any pointer may be NULL.
///
/// # Safety
/// Each pointer is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn dynq_ort_weight_cache_stats(
    live: *mut usize,
    bytes: *mut usize,
    hits: *mut u64,
    misses: *mut u64,
) {
    let s = cache::stats();
    // SAFETY: per the contract.
    unsafe {
        if !live.is_null() {
            *live = s.live;
        }
        if !bytes.is_null() {
            *bytes = s.bytes;
        }
        if !hits.is_null() {
            *hits = s.hits;
        }
        if !misses.is_null() {
            *misses = s.misses;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_shape_of_inferred_dims() {
        let (b, b2, s) = (c"batch", c"batch_2", c"seq");
        let none: *const c_char = ptr::null();
        let sym = |p: &std::ffi::CStr| p.as_ptr();
        let name = |p: *const c_char| {
            // SAFETY: the symbols above, or null.
            (!p.is_null()).then(|| unsafe { std::ffi::CStr::from_ptr(p) }.to_str().unwrap().to_string())
        };
        let run = |p: (&[i64], &[*const c_char]), r: (&[i64], &[*const c_char])| {
            broadcast_shape(p, r).map(|(d, s)| (d, s.into_iter().map(name).collect::<Vec<_>>()))
        };
        let some = |v: &str| Some(v.to_string());
        // The same symbols: kept.
        let (d, n) = run((&[-1, -1, 384], &[sym(b), sym(s), none]), (&[-1, -1, 384], &[sym(b), sym(s), none])).unwrap();
        assert_eq!((d, n), (vec![-1, -1, 384], vec![some("batch"), some("seq"), None]));
        // Different symbols: unknown, no symbol (the caller names it); 1 gives way to the other.
        let (d, n) = run((&[-1, -1, 384], &[sym(b), sym(s), none]), (&[-1, 1, 384], &[sym(b2), none, none])).unwrap();
        assert_eq!((d, n), (vec![-1, -1, 384], vec![None, some("seq"), None]));
        let (d, n) = run((&[1, 7, 384], &[none, none, none]), (&[-1, 7, 1], &[sym(b2), none, none])).unwrap();
        assert_eq!((d, n), (vec![-1, 7, 384], vec![some("batch_2"), None, None]));
        // Other ranks: right-aligned.
        let (d, _) = run((&[5, 384], &[none, none]), (&[2, 1, 384], &[none, none, none])).unwrap();
        assert_eq!(d, vec![2, 5, 384]);
        // Known sizes that do not broadcast.
        let e = run((&[2, 384], &[none, none]), (&[3, 384], &[none, none])).unwrap_err();
        assert!(e.contains("does not broadcast"), "{e}");
    }
}
