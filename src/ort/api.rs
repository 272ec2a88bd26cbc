//! Thin checked wrappers over the ONNX Runtime C API (types from `ort-sys`, function pointers from
//! the `OrtApi` table that ONNX Runtime hands to `RegisterCustomOps`).
//!
//! Every wrapper turns a non-null `OrtStatus` into an `Err(String)` holding ONNX Runtime's
//! message (and releases the status), so the op code can use `?` and report one clear message.

use ort_sys::{
    OrtApi, OrtErrorCode, OrtKernelContext, OrtKernelInfo, OrtStatus, OrtStatusPtr, OrtTensorTypeAndShapeInfo, OrtValue,
};
use std::ffi::{c_char, CStr, CString};
use std::ptr;

/// ONNX tensor element types used by the op (numbers of `ONNXTensorElementDataType`).
pub const ELEM_FLOAT: i32 = 1;
pub const ELEM_UINT8: i32 = 2;
pub const ELEM_INT8: i32 = 3;
pub const ELEM_FLOAT16: i32 = 10;

/// Human-readable name of an ONNX element type number.
pub fn elem_name(t: i32) -> String {
    let s = match t {
        0 => "undefined",
        1 => "float",
        2 => "uint8",
        3 => "int8",
        4 => "uint16",
        5 => "int16",
        6 => "int32",
        7 => "int64",
        8 => "string",
        9 => "bool",
        10 => "float16",
        11 => "double",
        12 => "uint32",
        13 => "uint64",
        16 => "bfloat16",
        _ => return format!("element type {t}"),
    };
    s.to_string()
}

/// The API table, valid for the life of the process once ONNX Runtime gave it to us.
#[derive(Clone, Copy)]
pub struct Api(pub &'static OrtApi);

// SAFETY: the OrtApi table is an immutable table of function pointers, usable from any thread.
unsafe impl Send for Api {}
unsafe impl Sync for Api {}

/// Converts an `OrtStatusPtr` into a `Result`, releasing the status.
pub fn check(api: Api, st: OrtStatusPtr) -> Result<(), String> {
    if st.0.is_null() {
        return Ok(());
    }
    // SAFETY: `st` is a live status returned by ONNX Runtime; the message is valid until release.
    let msg = unsafe {
        let m = (api.0.GetErrorMessage)(st.0);
        let s = if m.is_null() { "unknown ONNX Runtime error".to_string() } else { cstr(m) };
        (api.0.ReleaseStatus)(st.0);
        s
    };
    Err(msg)
}

/// Creates an ONNX Runtime status carrying `msg` (interior NULs replaced).
pub fn make_status(api: &OrtApi, code: OrtErrorCode, msg: &str) -> *mut OrtStatus {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    // SAFETY: CreateStatus copies the message.
    unsafe { (api.CreateStatus)(code, c.as_ptr()).0 }
}

/// Copies a NUL-terminated C string.
///
/// # Safety
/// `p` is a valid NUL-terminated string.
pub unsafe fn cstr(p: *const c_char) -> String {
    // SAFETY: per the contract.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Element type and dimensions of a tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorShape {
    pub elem: i32,
    pub dims: Vec<i64>,
}

/// Number of elements of a shape (dims are concrete at run time), or None on overflow or a
/// negative dim.
pub fn numel(dims: &[i64]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| usize::try_from(d).ok().and_then(|d| acc.checked_mul(d)))
}

impl TensorShape {
    /// Number of elements (see [`numel`]).
    pub fn numel(&self) -> Option<usize> {
        numel(&self.dims)
    }
    pub fn describe(&self) -> String {
        format!("{} {:?}", elem_name(self.elem), self.dims)
    }
}

/// Reads element type and dims from a type-and-shape info (does not release it).
///
/// # Safety
/// `info` is a live `OrtTensorTypeAndShapeInfo`.
pub unsafe fn read_shape_info(api: Api, info: *const OrtTensorTypeAndShapeInfo) -> Result<TensorShape, String> {
    let mut elem: i32 = 0;
    let mut count: usize = 0;
    // SAFETY: `info` is live; the element type is written as a C enum (an int), which we read as
    // an i32 so that a value this build does not know cannot be an invalid Rust enum.
    unsafe {
        check(api, (api.0.GetTensorElementType)(info, (&mut elem as *mut i32).cast()))?;
        check(api, (api.0.GetDimensionsCount)(info, &mut count))?;
    }
    let mut dims = vec![0i64; count];
    if count > 0 {
        // SAFETY: `dims` has `count` slots.
        unsafe { check(api, (api.0.GetDimensions)(info, dims.as_mut_ptr(), count))? };
    }
    Ok(TensorShape { elem, dims })
}

/// Element type and dims of a tensor value.
///
/// # Safety
/// `value` is a live tensor `OrtValue`.
pub unsafe fn value_shape(api: Api, value: *const OrtValue) -> Result<TensorShape, String> {
    let mut info: *mut OrtTensorTypeAndShapeInfo = ptr::null_mut();
    // SAFETY: `value` is live; `info` is released below.
    unsafe {
        check(api, (api.0.GetTensorTypeAndShape)(value, &mut info))?;
        let r = read_shape_info(api, info);
        (api.0.ReleaseTensorTypeAndShapeInfo)(info);
        r
    }
}

/// Data pointer of a tensor value.
///
/// # Safety
/// `value` is a live tensor `OrtValue`.
pub unsafe fn value_data(api: Api, value: *const OrtValue) -> Result<*mut u8, String> {
    let mut p: *mut std::ffi::c_void = ptr::null_mut();
    // SAFETY: ONNX Runtime's own custom-op helpers cast away const the same way to read inputs.
    unsafe { check(api, (api.0.GetTensorMutableData)(value as *mut OrtValue, &mut p))? };
    Ok(p.cast())
}

/// A string attribute of the node: `Ok(None)` when absent, `Err` when present with another type.
///
/// # Safety
/// `info` is a live kernel info.
pub unsafe fn attr_string(api: Api, info: *const OrtKernelInfo, name: &str) -> Result<Option<String>, String> {
    let cname = CString::new(name).expect("attribute names have no NUL");
    let mut size: usize = 0;
    // SAFETY: a NULL buffer asks for the size (including the NUL).
    let st = unsafe { (api.0.KernelInfoGetAttribute_string)(info, cname.as_ptr(), ptr::null_mut(), &mut size) };
    if check(api, st).is_err() {
        let mut i: i64 = 0;
        // SAFETY: as above.
        let st = unsafe { (api.0.KernelInfoGetAttribute_int64)(info, cname.as_ptr(), &mut i) };
        if check(api, st).is_ok() {
            return Err(format!("attribute '{name}' must be a string, got the integer {i}"));
        }
        let mut f: f32 = 0.0;
        // SAFETY: as above.
        let st = unsafe { (api.0.KernelInfoGetAttribute_float)(info, cname.as_ptr(), &mut f) };
        if check(api, st).is_ok() {
            return Err(format!("attribute '{name}' must be a string, got the float {f}"));
        }
        return Ok(None);
    }
    let mut buf = vec![0u8; size.max(1)];
    // SAFETY: `buf` has `size` bytes.
    unsafe {
        check(api, (api.0.KernelInfoGetAttribute_string)(info, cname.as_ptr(), buf.as_mut_ptr().cast(), &mut size))?
    };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(Some(String::from_utf8_lossy(&buf[..end]).into_owned()))
}

/// A float attribute of the node: `Ok(None)` when absent, `Err` when present with another type.
///
/// # Safety
/// `info` is a live kernel info.
pub unsafe fn attr_float(api: Api, info: *const OrtKernelInfo, name: &str) -> Result<Option<f32>, String> {
    let cname = CString::new(name).expect("attribute names have no NUL");
    let mut f: f32 = 0.0;
    // SAFETY: `f` receives the value.
    let st = unsafe { (api.0.KernelInfoGetAttribute_float)(info, cname.as_ptr(), &mut f) };
    if check(api, st).is_ok() {
        return Ok(Some(f));
    }
    let mut i: i64 = 0;
    // SAFETY: as above.
    let st = unsafe { (api.0.KernelInfoGetAttribute_int64)(info, cname.as_ptr(), &mut i) };
    if check(api, st).is_ok() {
        return Err(format!("attribute '{name}' must be a float, got the integer {i}"));
    }
    let mut size: usize = 0;
    // SAFETY: a NULL buffer asks for the size.
    let st = unsafe { (api.0.KernelInfoGetAttribute_string)(info, cname.as_ptr(), ptr::null_mut(), &mut size) };
    if check(api, st).is_ok() {
        return Err(format!("attribute '{name}' must be a float, got a string"));
    }
    Ok(None)
}

/// An integer-list attribute of the node: `Ok(None)` when absent.
///
/// # Safety
/// `info` is a live kernel info.
pub unsafe fn attr_ints(api: Api, info: *const OrtKernelInfo, name: &str) -> Result<Option<Vec<i64>>, String> {
    let cname = CString::new(name).expect("attribute names have no NUL");
    let mut size: usize = 0;
    // SAFETY: a NULL buffer asks for the count.
    let st = unsafe { (api.0.KernelInfoGetAttributeArray_int64)(info, cname.as_ptr(), ptr::null_mut(), &mut size) };
    // Some versions report a single integer as an empty list rather than as an error.
    if check(api, st).is_err() || size == 0 {
        // Absent, or of another type: a single integer is a mistake worth naming.
        let mut i: i64 = 0;
        // SAFETY: as above.
        let st = unsafe { (api.0.KernelInfoGetAttribute_int64)(info, cname.as_ptr(), &mut i) };
        if check(api, st).is_ok() {
            return Err(format!("attribute '{name}' must be a list of integers, got the integer {i}"));
        }
        return Ok(None);
    }
    let mut v = vec![0i64; size];
    if size > 0 {
        // SAFETY: `v` has `size` slots.
        unsafe {
            check(api, (api.0.KernelInfoGetAttributeArray_int64)(info, cname.as_ptr(), v.as_mut_ptr(), &mut size))?
        };
        v.truncate(size);
    }
    Ok(Some(v))
}

/// Number of outputs of the node.
///
/// # Safety
/// `info` is a live kernel info.
pub unsafe fn kernel_info_output_count(api: Api, info: *const OrtKernelInfo) -> Result<usize, String> {
    let mut n: usize = 0;
    // SAFETY: per the contract.
    unsafe { check(api, (api.0.KernelInfo_GetOutputCount)(info, &mut n))? };
    Ok(n)
}

/// The node's name (may be empty).
///
/// # Safety
/// `info` is a live kernel info.
pub unsafe fn node_name(api: Api, info: *const OrtKernelInfo) -> String {
    let mut size: usize = 0;
    // SAFETY: NULL buffer asks for the size.
    if check(api, unsafe { (api.0.KernelInfo_GetNodeName)(info, ptr::null_mut(), &mut size) }).is_err() {
        return String::new();
    }
    let mut buf = vec![0u8; size.max(1)];
    // SAFETY: `buf` has `size` bytes.
    if check(api, unsafe { (api.0.KernelInfo_GetNodeName)(info, buf.as_mut_ptr().cast(), &mut size) }).is_err() {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Number of inputs of the node.
///
/// # Safety
/// `info` is a live kernel info.
pub unsafe fn kernel_info_input_count(api: Api, info: *const OrtKernelInfo) -> Result<usize, String> {
    let mut n = 0usize;
    // SAFETY: per the contract.
    unsafe { check(api, (api.0.KernelInfo_GetInputCount)(info, &mut n))? };
    Ok(n)
}

/// The constant (initializer) value of input `index`, if it is one. The value is owned by ONNX
/// Runtime and lives as long as the session.
///
/// # Safety
/// `info` is a live kernel info.
pub unsafe fn constant_input(
    api: Api,
    info: *const OrtKernelInfo,
    index: usize,
) -> Result<Option<*const OrtValue>, String> {
    let mut is_const: std::ffi::c_int = 0;
    let mut v: *const OrtValue = ptr::null();
    // SAFETY: per the contract.
    unsafe { check(api, (api.0.KernelInfoGetConstantInput_tensor)(info, index, &mut is_const, &mut v))? };
    Ok((is_const != 0 && !v.is_null()).then_some(v))
}

/// Input `index` of a running kernel, or None for an absent optional input.
///
/// # Safety
/// `ctx` is a live kernel context.
pub unsafe fn context_input(
    api: Api,
    ctx: *const OrtKernelContext,
    index: usize,
) -> Result<Option<*const OrtValue>, String> {
    let mut count = 0usize;
    // SAFETY: per the contract.
    unsafe { check(api, (api.0.KernelContext_GetInputCount)(ctx, &mut count))? };
    if index >= count {
        return Ok(None);
    }
    let mut v: *const OrtValue = ptr::null();
    // SAFETY: `index < count`.
    unsafe { check(api, (api.0.KernelContext_GetInput)(ctx, index, &mut v))? };
    Ok((!v.is_null()).then_some(v))
}
