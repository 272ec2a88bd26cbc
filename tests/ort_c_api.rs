//! `libdynq.so` as an ONNX Runtime custom-op library loaded through ONNX Runtime's C API, the way
//! C, C++ and C# servers load it (`OrtApi::RegisterCustomOpsLibrary_V2`, which C++'s
//! `Ort::SessionOptions::RegisterCustomOpsLibrary` and C#'s `RegisterCustomOpLibraryV2` call, and
//! the older `RegisterCustomOpsLibrary`, whose library handle the caller keeps and closes).
//!
//! No ONNX Runtime SDK is needed: the test takes the runtime that an `onnxruntime` pip package
//! ships, `ort-sys` for the C API's types, and `dlopen`. For each runtime (the default
//! `python3`'s, and the oldest supported one in the `target/py-ort1.17` virtual environment that
//! `scripts/setup.sh` makes):
//!
//! 1. `tests/ort_c_api.py`, run by that Python, builds a small fp32 model (MatMul, Add, Relu,
//!    MatMul, Add), converts it with `python -m dynq.onnx quantize` (two `dynq.DynQMatMul`
//!    nodes), runs both models with that onnxruntime's Python API for reference outputs, and
//!    writes two malformed dynq models;
//! 2. this test binary, started again as a child process (so that each runtime has a process of
//!    its own and a crash is reported as one), is the C API client. It checks:
//!    - `RegisterCustomOpsLibrary_V2`: the converted model runs; its output is bit-identical to
//!      the Python API's and close to the fp32 model's (cosine > 0.999); the session options
//!      may be released before the session is run;
//!    - the older `RegisterCustomOpsLibrary`: the same, keeping the returned handle until the
//!      session and its options are released, then closing it (no packed weight left alive);
//!    - the library registered twice in one session options (the second registration must not
//!      add the domain again: ONNX Runtime would refuse the session, "Domain already set in
//!      registry"), and in two session options whose two sessions (one per API, different
//!      thread counts) run at once from four threads and share their packed weights;
//!    - errors come back as statuses with messages, never as crashes: a library path that does
//!      not exist (with either API; the options stay usable), a weight of the wrong type, an
//!      unknown attribute value, a NaN activation;
//!    - registering again after everything was released, and after options that were released
//!      without a session (ONNX Runtime then unloads the library: loaded again).
//!
//! The wheels of onnxruntime 1.17 and 1.18 ship no `libonnxruntime.so`: the C API is linked into
//! their Python extension module and not exported. For them, tests/ort_c_api.py finds the
//! runtime's `OrtApiBase` in a Python process the way every custom-op library receives it, from a
//! four-line C library (compiled here with `cc`) that the Python API registers, and records its
//! offset in the module; the child then loads that module as a plain library (libpython loaded
//! for its symbols, no interpreter started) and makes the same C API calls.
//!
//! The library under test: `$DYNQ_LIBRARY` if set, else the `libdynq.so` cargo built with this
//! test (in `target/<profile>/deps`), else `target/release/libdynq.so`; the Python side uses the
//! same one. Without python3, onnxruntime, that virtual environment, or (for a wheel without
//! libonnxruntime.so) a C compiler and a shared libpython, the runtime is skipped with a message,
//! unless `DYNQ_REQUIRE_ORT=1`, which turns every skip into a failure (scripts/test.sh sets it).
//! `DYNQ_ORT_PYTHONS` (a `:`-separated list of Pythons) adds more runtimes (checked so: 1.18.1,
//! 1.19.2, 1.21.1).
#![cfg(target_os = "linux")]

use ort_sys::{
    ONNXTensorElementDataType, OrtAllocatorType, OrtApi, OrtApiBase, OrtEnv, OrtErrorCode, OrtLoggingLevel, OrtMemType,
    OrtMemoryInfo, OrtSession, OrtSessionOptions, OrtStatusPtr, OrtTensorTypeAndShapeInfo, OrtValue,
};
use std::collections::HashMap;
use std::ffi::{c_int, c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr;

/// Set (to the work directory) in the child process that acts as the C API client.
const CHILD_ENV: &str = "DYNQ_ORT_C_API_CHILD";
const ENV_DYNQ: &str = "DYNQ_ORT_C_API_DYNQ";
const ENV_ORT: &str = "DYNQ_ORT_C_API_ORT";
const ENV_LIBPYTHON: &str = "DYNQ_ORT_C_API_LIBPYTHON";
const ENV_SHIM: &str = "DYNQ_ORT_C_API_SHIM";
/// The child's last line when every check passed (a child that ran no test also exits with 0).
const DONE: &str = "ort_c_api: all checks passed";
/// The C API version dynq is compiled against (src/ort).
const API_VERSION: u32 = 17;

/// The custom-op library whose `RegisterCustomOps` keeps the `OrtApiBase` it is given.
const SHIM_C: &str = r#"
static const void *base;
void *RegisterCustomOps(void *options, const void *api_base) { (void)options; base = api_base; return 0; }
const void *dynq_test_ort_api_base(void) { return base; }
"#;

#[test]
fn c_api_default_onnxruntime() {
    run_against("default", Path::new("python3"));
}

#[test]
fn c_api_oldest_onnxruntime() {
    run_against("ort1.17", &Path::new(env!("CARGO_MANIFEST_DIR")).join("target/py-ort1.17/bin/python"));
}

/// More runtimes on request: `DYNQ_ORT_PYTHONS=/venv-a/bin/python:/venv-b/bin/python` (Pythons
/// with onnxruntime, onnx and numpy) runs the same checks on each of their onnxruntimes.
#[test]
fn c_api_more_onnxruntimes() {
    if let Some(list) = std::env::var_os("DYNQ_ORT_PYTHONS") {
        for (i, python) in std::env::split_paths(&list).enumerate() {
            run_against(&format!("more{i}"), &python);
        }
    }
}

/// The C API client: does nothing unless started by `run_against` (it is ignored otherwise).
#[test]
#[ignore = "the C API client process of the tests above, started by them"]
fn child_process() {
    if let Some(work) = std::env::var_os(CHILD_ENV) {
        child::main(Path::new(&work));
    }
}

fn required() -> bool {
    std::env::var("DYNQ_REQUIRE_ORT").is_ok_and(|v| v == "1")
}

fn skip(label: &str, why: &str) {
    assert!(!required(), "DYNQ_REQUIRE_ORT=1, but the ONNX Runtime C API test ({label}) cannot run: {why}");
    eprintln!("SKIPPED: ONNX Runtime C API test ({label}): {why}");
}

/// The libdynq.so under test (see the module documentation).
fn dynq_library() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DYNQ_LIBRARY") {
        return Some(PathBuf::from(p));
    }
    // Integration tests run from target/<profile>/deps, where cargo also built the cdylib for
    // them (target/<profile>/libdynq.so is only updated by `cargo build`, and may be stale).
    let exe = std::env::current_exe().ok()?;
    let built = exe.parent()?.join("libdynq.so");
    if built.is_file() {
        return Some(built);
    }
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/libdynq.so");
    release.is_file().then_some(release)
}

fn output_text(out: &std::process::Output) -> String {
    format!("--- stdout\n{}--- stderr\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn read_meta(work: &Path) -> HashMap<String, String> {
    let text = std::fs::read_to_string(work.join("meta.txt")).expect("meta.txt");
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// What the probe of a Python reports about its onnxruntime and itself.
const PROBE: &str = "import os, sysconfig, onnx, numpy, onnxruntime
d = os.path.dirname(os.path.abspath(onnxruntime.__file__))
libdir, soname = sysconfig.get_config_var('LIBDIR'), sysconfig.get_config_var('INSTSONAME')
print(onnxruntime.__version__)
print(os.path.join(d, 'capi'))
print(os.path.join(libdir, soname) if sysconfig.get_config_var('Py_ENABLE_SHARED') and libdir and soname else '')
";

/// Makes the models with `python`, then runs the C API client on that Python's onnxruntime.
fn run_against(label: &str, python: &Path) {
    let probe = match Command::new(python).args(["-c", PROBE]).output() {
        Err(e) => return skip(label, &format!("cannot run {}: {e}", python.display())),
        Ok(out) if !out.status.success() => {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err.lines().last().unwrap_or("").to_string();
            return skip(label, &format!("{} cannot import onnxruntime, onnx and numpy: {last}", python.display()));
        }
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
    };
    let probe: Vec<&str> = probe.lines().collect();
    let [version, capi, libpython] = probe[..] else { panic!("unexpected probe output {probe:?}") };
    let Some(lib) = dynq_library() else {
        return skip(label, "no libdynq.so (set DYNQ_LIBRARY or build the library)");
    };
    let lib = lib.canonicalize().unwrap_or_else(|e| panic!("libdynq.so: {}: {e}", lib.display()));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ort_c_api").join(label);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work directory");

    let mut gen = Command::new(python);
    gen.arg(root.join("tests/ort_c_api.py"))
        .arg(&work)
        .env("PYTHONPATH", root.join("bindings/python"))
        .env("DYNQ_LIBRARY", &lib)
        .env_remove("DYNQ_ORT_VERBOSE");
    let mut child = Command::new(std::env::current_exe().expect("test binary"));
    child
        .args(["child_process", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &work)
        .env(ENV_DYNQ, &lib)
        .env_remove("DYNQ_ORT_VERBOSE");

    let mut ort_libs: Vec<PathBuf> =
        std::fs::read_dir(capi).map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect()).unwrap_or_default();
    ort_libs.retain(|p| p.file_name().is_some_and(|n| n.as_bytes().starts_with(b"libonnxruntime.so")));
    ort_libs.sort();
    let route = if let Some(ort) = ort_libs.first() {
        child.env(ENV_ORT, ort);
        format!("{}", ort.display())
    } else {
        // A wheel without libonnxruntime.so (onnxruntime 1.17, 1.18): see the module documentation.
        if libpython.is_empty() || !Path::new(libpython).is_file() {
            let why = format!(
                "onnxruntime {version} ships no libonnxruntime.so in {capi}, and {} has no shared libpython \
                 to load its Python module with",
                python.display()
            );
            return skip(label, &why);
        }
        let src = work.join("ortapibase.c");
        let shim = work.join("libortapibase.so");
        std::fs::write(&src, SHIM_C).expect("write the C shim");
        let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
        match Command::new(&cc).args(["-shared", "-fPIC", "-O1", "-o"]).arg(&shim).arg(&src).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!("{} could not compile the C shim\n{}", cc.to_string_lossy(), output_text(&out)),
            Err(e) => {
                let why = format!(
                    "onnxruntime {version} ships no libonnxruntime.so in {capi}, and finding the C API in its \
                     Python module needs a C compiler ({}: {e})",
                    cc.to_string_lossy()
                );
                return skip(label, &why);
            }
        }
        gen.env(ENV_SHIM, &shim);
        child.env(ENV_LIBPYTHON, libpython);
        "its Python extension module (the wheel has no libonnxruntime.so)".to_string()
    };

    let out = gen.output().expect("run tests/ort_c_api.py");
    assert!(out.status.success(), "tests/ort_c_api.py failed with {}\n{}", python.display(), output_text(&out));
    println!("ONNX Runtime {version} through {route}; {}", lib.display());
    let out = child.output().expect("run the C API client process");
    let text = output_text(&out);
    println!("{text}");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(DONE),
        "the C API client on ONNX Runtime {version} failed ({}); its output:\n{text}",
        out.status
    );
}

/// The C API client (runs in the child process).
mod child {
    use super::*;

    /// dlopen, with dlerror's message on failure.
    fn dlopen(path: &Path, flags: c_int) -> Result<*mut c_void, String> {
        let c = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
        // SAFETY: a NUL-terminated path; dlerror's message is read at once, on this thread.
        unsafe {
            let h = libc::dlopen(c.as_ptr(), flags);
            if h.is_null() {
                let e = libc::dlerror();
                return Err(if e.is_null() {
                    "dlopen failed".into()
                } else {
                    CStr::from_ptr(e).to_string_lossy().into()
                });
            }
            Ok(h)
        }
    }

    /// dlsym, panicking when the symbol is missing.
    fn dlsym(handle: *mut c_void, name: &CStr) -> *mut c_void {
        // SAFETY: `handle` is a live handle from dlopen; `name` is NUL-terminated.
        let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
        assert!(!p.is_null(), "symbol {name:?} not found");
        p
    }

    /// `OrtApiBase` of a `libonnxruntime.so` (which stays loaded for the process).
    fn load_ort_library(path: &Path) -> *const OrtApiBase {
        let h = dlopen(path, libc::RTLD_NOW | libc::RTLD_LOCAL).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let get = dlsym(h, c"OrtGetApiBase");
        // SAFETY: OrtGetApiBase has this signature in every ONNX Runtime.
        let get: unsafe extern "C" fn() -> *const OrtApiBase = unsafe { std::mem::transmute(get) };
        // SAFETY: no arguments; returns a pointer to a static table.
        unsafe { get() }
    }

    /// `OrtApiBase` of the ONNX Runtime linked into an onnxruntime wheel's Python extension
    /// module (no libonnxruntime.so in the wheel), at the offset that tests/ort_c_api.py measured
    /// in a Python process. The module is loaded as a plain library: no Python interpreter, so
    /// no second ONNX Runtime environment (Python's is made when the module is imported, and
    /// the C API's CreateEnv then fails: "Only one instance of LoggingManager created with
    /// InstanceType::Default can exist at any point in time").
    fn load_ort_from_python_module(module: &Path, offset: usize) -> *const OrtApiBase {
        let libpython = PathBuf::from(std::env::var_os(ENV_LIBPYTHON).expect("libpython path"));
        // The module finds libpython's symbols in the global scope (it does not link libpython).
        dlopen(&libpython, libc::RTLD_NOW | libc::RTLD_GLOBAL).expect("load libpython");
        let h =
            dlopen(module, libc::RTLD_NOW | libc::RTLD_LOCAL).unwrap_or_else(|e| panic!("{}: {e}", module.display()));
        let stem = module.file_name().and_then(|n| n.to_str()).and_then(|n| n.split('.').next()).expect("module name");
        let init = dlsym(h, &CString::new(format!("PyInit_{stem}")).expect("no NUL"));
        let module_of = |p: *const c_void| {
            // SAFETY: Dl_info holds pointers only (all zeros is a valid value); dladdr only reads
            // the loader's tables and fills `info`.
            let (found, info) = unsafe {
                let mut info: libc::Dl_info = std::mem::zeroed();
                (libc::dladdr(p, &mut info), info)
            };
            assert!(found != 0, "no module at {p:?}");
            info.dli_fbase as usize
        };
        let fbase = module_of(init);
        let base = (fbase + offset) as *const OrtApiBase;
        // Its two functions must be code of the same module.
        // SAFETY: `base` is inside the module's mapping (same offset as in the Python process).
        let (get_api, get_version) =
            unsafe { ((*base).GetApi as *const c_void, (*base).GetVersionString as *const c_void) };
        assert!(module_of(get_api) == fbase && module_of(get_version) == fbase, "no OrtApiBase at offset {offset:#x}");
        base
    }

    /// A status turned into a result: `Err((code, message))`, the status released.
    type OrtResult<T> = Result<T, (OrtErrorCode, String)>;

    #[derive(Clone, Copy)]
    struct Ort(&'static OrtApi);

    impl Ort {
        fn status(self, st: OrtStatusPtr) -> OrtResult<()> {
            if st.0.is_null() {
                return Ok(());
            }
            // SAFETY: a live status from ONNX Runtime; its message is copied before the release.
            unsafe {
                let code = (self.0.GetErrorCode)(st.0);
                let m = (self.0.GetErrorMessage)(st.0);
                let msg = if m.is_null() { String::new() } else { CStr::from_ptr(m).to_string_lossy().into_owned() };
                (self.0.ReleaseStatus)(st.0);
                Err((code, msg))
            }
        }

        fn ok(self, st: OrtStatusPtr, what: &str) {
            if let Err((code, msg)) = self.status(st) {
                panic!("{what} failed: {code:?}: {msg}");
            }
        }
    }

    /// An ONNX Runtime object, released with its `Release*` function when dropped.
    struct Owned<T> {
        ptr: *mut T,
        release: unsafe extern "system" fn(*mut T),
    }

    impl<T> Owned<T> {
        fn new(ptr: *mut T, release: unsafe extern "system" fn(*mut T)) -> Self {
            assert!(!ptr.is_null(), "ONNX Runtime returned success and no object");
            Owned { ptr, release }
        }
    }

    impl<T> Drop for Owned<T> {
        fn drop(&mut self) {
            // SAFETY: made by ONNX Runtime and released once, here.
            unsafe { (self.release)(self.ptr) }
        }
    }

    /// A library handle from the older `RegisterCustomOpsLibrary`, closed when dropped.
    struct LibHandle(*mut c_void);

    impl Drop for LibHandle {
        fn drop(&mut self) {
            // SAFETY: a dlopen handle that ONNX Runtime handed over to us; closed once.
            assert_eq!(unsafe { libc::dlclose(self.0) }, 0, "dlclose of the custom-op library handle");
        }
    }

    fn cpath(p: &Path) -> CString {
        CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
    }

    fn create_env(ort: Ort) -> Owned<OrtEnv> {
        let mut env = ptr::null_mut();
        // SAFETY: a static log id; `env` receives the new environment.
        let st =
            unsafe { (ort.0.CreateEnv)(OrtLoggingLevel::ORT_LOGGING_LEVEL_ERROR, c"dynq-c-api".as_ptr(), &mut env) };
        ort.ok(st, "CreateEnv");
        Owned::new(env, ort.0.ReleaseEnv)
    }

    fn options(ort: Ort, threads: c_int) -> Owned<OrtSessionOptions> {
        let mut so = ptr::null_mut();
        // SAFETY: `so` receives the new options, which the later calls configure.
        ort.ok(unsafe { (ort.0.CreateSessionOptions)(&mut so) }, "CreateSessionOptions");
        let so = Owned::new(so, ort.0.ReleaseSessionOptions);
        // SAFETY: live options.
        unsafe {
            ort.ok((ort.0.SetIntraOpNumThreads)(so.ptr, threads), "SetIntraOpNumThreads");
            ort.ok((ort.0.SetInterOpNumThreads)(so.ptr, 1), "SetInterOpNumThreads");
        }
        so
    }

    fn register_v2(ort: Ort, so: &Owned<OrtSessionOptions>, lib: &Path) -> OrtResult<()> {
        let path = cpath(lib);
        // SAFETY: live options and a NUL-terminated path (ORTCHAR_T is char on Linux).
        ort.status(unsafe { (ort.0.RegisterCustomOpsLibrary_V2)(so.ptr, path.as_ptr()) })
    }

    fn register_legacy(ort: Ort, so: &Owned<OrtSessionOptions>, lib: &Path) -> OrtResult<LibHandle> {
        let path = cpath(lib);
        let mut handle: *mut c_void = ptr::null_mut();
        // SAFETY: live options, a NUL-terminated path; `handle` receives the dlopen handle.
        let r = ort.status(unsafe { (ort.0.RegisterCustomOpsLibrary)(so.ptr, path.as_ptr(), &mut handle) });
        match r {
            Ok(()) => {
                assert!(!handle.is_null(), "RegisterCustomOpsLibrary succeeded without a library handle");
                Ok(LibHandle(handle))
            }
            Err(e) => {
                assert!(handle.is_null(), "RegisterCustomOpsLibrary failed but returned a library handle");
                Err(e)
            }
        }
    }

    fn session(
        ort: Ort,
        env: &Owned<OrtEnv>,
        so: &Owned<OrtSessionOptions>,
        model: &Path,
    ) -> OrtResult<Owned<OrtSession>> {
        let path = cpath(model);
        let mut s = ptr::null_mut();
        // SAFETY: live environment and options, a NUL-terminated path; `s` receives the session.
        ort.status(unsafe { (ort.0.CreateSession)(env.ptr, path.as_ptr(), so.ptr, &mut s) })?;
        Ok(Owned::new(s, ort.0.ReleaseSession))
    }

    /// Runs `y = model(x)` with `x` of shape `[rows, k]`; returns y's dims and values.
    fn run(ort: Ort, s: *mut OrtSession, x: &[f32], rows: usize, k: usize) -> OrtResult<(Vec<i64>, Vec<f32>)> {
        assert_eq!(x.len(), rows * k);
        let mut info: *mut OrtMemoryInfo = ptr::null_mut();
        // SAFETY: `info` receives a CPU memory description.
        let st = unsafe {
            (ort.0.CreateCpuMemoryInfo)(OrtAllocatorType::OrtArenaAllocator, OrtMemType::OrtMemTypeDefault, &mut info)
        };
        ort.ok(st, "CreateCpuMemoryInfo");
        let info = Owned::new(info, ort.0.ReleaseMemoryInfo);
        let shape = [rows as i64, k as i64];
        let mut input: *mut OrtValue = ptr::null_mut();
        // SAFETY: the tensor borrows `x` (ONNX Runtime only reads an input), which outlives the
        // value: the value is released at the end of this function.
        let st = unsafe {
            (ort.0.CreateTensorWithDataAsOrtValue)(
                info.ptr,
                x.as_ptr() as *mut c_void,
                std::mem::size_of_val(x),
                shape.as_ptr(),
                shape.len(),
                ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                &mut input,
            )
        };
        ort.ok(st, "CreateTensorWithDataAsOrtValue");
        let input = Owned::new(input, ort.0.ReleaseValue);
        let mut output: *mut OrtValue = ptr::null_mut();
        let (in_name, out_name) = (c"x".as_ptr(), c"y".as_ptr());
        let inputs = [input.ptr as *const OrtValue];
        // SAFETY: one input and one output name and value; ONNX Runtime allocates the output.
        let st = unsafe { (ort.0.Run)(s, ptr::null(), &in_name, inputs.as_ptr(), 1, &out_name, 1, &mut output) };
        ort.status(st)?;
        let output = Owned::new(output, ort.0.ReleaseValue);
        let mut ti: *mut OrtTensorTypeAndShapeInfo = ptr::null_mut();
        // SAFETY: `output` is a live tensor; `ti` is released below.
        ort.ok(unsafe { (ort.0.GetTensorTypeAndShape)(output.ptr, &mut ti) }, "GetTensorTypeAndShape");
        let ti = Owned::new(ti, ort.0.ReleaseTensorTypeAndShapeInfo);
        let (mut elem, mut count) = (0i32, 0usize);
        // SAFETY: live type info; the element type (a C enum) is read as an int.
        unsafe {
            ort.ok((ort.0.GetTensorElementType)(ti.ptr, (&mut elem as *mut i32).cast()), "GetTensorElementType");
            ort.ok((ort.0.GetDimensionsCount)(ti.ptr, &mut count), "GetDimensionsCount");
        }
        assert_eq!(elem, ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT as i32, "output type");
        let mut dims = vec![0i64; count];
        // SAFETY: `dims` has `count` slots.
        ort.ok(unsafe { (ort.0.GetDimensions)(ti.ptr, dims.as_mut_ptr(), count) }, "GetDimensions");
        let n: usize = dims.iter().map(|&d| usize::try_from(d).expect("concrete dims")).product();
        let mut data: *mut c_void = ptr::null_mut();
        // SAFETY: a float tensor of `n` elements, copied out before the value is released.
        let y = unsafe {
            ort.ok((ort.0.GetTensorMutableData)(output.ptr, &mut data), "GetTensorMutableData");
            std::slice::from_raw_parts(data as *const f32, n).to_vec()
        };
        drop((ti, output, input, info));
        Ok((dims, y))
    }

    /// dynq's packed-weight cache counters (live, bytes, hits, misses) from a library handle.
    fn cache_stats_from(handle: *mut c_void) -> [u64; 4] {
        let f = dlsym(handle, c"dynq_ort_weight_cache_stats");
        let (mut live, mut bytes, mut hits, mut misses) = (0usize, 0usize, 0u64, 0u64);
        // SAFETY: the exported function's signature (include/dynq.h); all pointers writable.
        unsafe {
            let f: unsafe extern "C" fn(*mut usize, *mut usize, *mut u64, *mut u64) = std::mem::transmute(f);
            f(&mut live, &mut bytes, &mut hits, &mut misses);
        }
        [live as u64, bytes as u64, hits, misses]
    }

    /// The counters if ONNX Runtime has libdynq.so loaded at the moment, else None.
    fn cache_stats(lib: &Path) -> Option<[u64; 4]> {
        let h = dlopen(lib, libc::RTLD_NOW | libc::RTLD_NOLOAD).ok()?;
        let s = cache_stats_from(h);
        // SAFETY: balances the dlopen just above.
        unsafe { libc::dlclose(h) };
        Some(s)
    }

    /// The test's data, as written by tests/ort_c_api.py.
    struct Data {
        work: PathBuf,
        lib: PathBuf,
        rows: usize,
        k: usize,
        n: usize,
        x: Vec<f32>,
        reference: Vec<f32>,
        python: Vec<f32>,
    }

    fn read_f32(path: &Path) -> Vec<f32> {
        let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
    }

    impl Data {
        fn model(&self, name: &str) -> PathBuf {
            self.work.join(name)
        }

        /// Checks an output of dq.onnx for `self.x`; returns its cosine with the fp32 output.
        fn check(&self, what: &str, dims: &[i64], y: &[f32]) -> f64 {
            assert_eq!(dims, [self.rows as i64, self.n as i64], "{what}: output shape");
            let (mut dot, mut yy, mut rr) = (0f64, 0f64, 0f64);
            for (&a, &b) in y.iter().zip(&self.reference) {
                dot += a as f64 * b as f64;
                yy += a as f64 * a as f64;
                rr += b as f64 * b as f64;
            }
            let cosine = dot / (yy.sqrt() * rr.sqrt());
            assert!(cosine > 0.999, "{what}: cosine with the fp32 model {cosine}");
            let differ = y.iter().zip(&self.python).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(differ, 0, "{what}: {differ} of {} values differ from the Python API's output", y.len());
            cosine
        }
    }

    /// Runs dq.onnx with the library registered by `RegisterCustomOpsLibrary_V2`, the session
    /// options released before the run.
    fn register_and_run(ort: Ort, env: &Owned<OrtEnv>, d: &Data, what: &str) -> f64 {
        let so = options(ort, 1);
        register_v2(ort, &so, &d.lib).unwrap_or_else(|e| panic!("{what}: RegisterCustomOpsLibrary_V2: {e:?}"));
        let s = session(ort, env, &so, &d.model("dq.onnx")).unwrap_or_else(|e| panic!("{what}: CreateSession: {e:?}"));
        // A C++ server's Ort::SessionOptions often goes out of scope before the session runs.
        drop(so);
        let (dims, y) = run(ort, s.ptr, &d.x, d.rows, d.k).unwrap_or_else(|e| panic!("{what}: Run: {e:?}"));
        if let Some([live, ..]) = cache_stats(&d.lib) {
            assert_eq!(live, 2, "{what}: packed weights alive with the session (two DynQMatMul nodes)");
        }
        drop(s);
        d.check(what, &dims, &y)
    }

    fn expect_err<T>(r: OrtResult<T>, what: &str) -> (OrtErrorCode, String) {
        match r {
            Ok(_) => panic!("{what}: succeeded, expected an error status"),
            Err((code, msg)) => {
                println!("ort_c_api: {what}: {code:?}: {msg}");
                assert!(!msg.trim().is_empty(), "{what}: an error status without a message");
                (code, msg)
            }
        }
    }

    pub fn main(work: &Path) {
        let meta = read_meta(work);
        let field = |k: &str| meta[k].parse::<usize>().expect("a number in meta.txt");
        let d = Data {
            work: work.to_path_buf(),
            lib: PathBuf::from(std::env::var_os(ENV_DYNQ).expect("libdynq.so path")),
            rows: field("rows"),
            k: field("k"),
            n: field("n"),
            x: read_f32(&work.join("x.f32")),
            reference: read_f32(&work.join("ref.f32")),
            python: read_f32(&work.join("py.f32")),
        };
        let base = match std::env::var_os(ENV_ORT) {
            Some(p) => load_ort_library(Path::new(&p)),
            None => load_ort_from_python_module(
                Path::new(&meta["ort_module"]),
                meta["ort_api_base_offset"].parse().expect("an offset in meta.txt"),
            ),
        };
        assert!(!base.is_null(), "OrtGetApiBase returned NULL");
        // SAFETY: ONNX Runtime's static API base; the version string is static too.
        let (base, version) = unsafe { (&*base, CStr::from_ptr(((*base).GetVersionString)()).to_string_lossy()) };
        assert_eq!(version, meta["ort_version"], "the runtime loaded is not the Python package's");
        // SAFETY: GetApi returns a static table, or NULL for a version the runtime lacks.
        let api = unsafe { (base.GetApi)(API_VERSION) };
        assert!(!api.is_null(), "ONNX Runtime {version} does not serve C API version {API_VERSION}");
        // SAFETY: the table lives for the process; ort-sys's OrtApi (feature api-17) has the
        // functions of version 17, a prefix of every later table.
        let ort = Ort(unsafe { &*api });
        println!("ort_c_api: ONNX Runtime {version}, C API {API_VERSION}, {}", d.lib.display());
        let env = create_env(ort);

        println!("ort_c_api: step: registered, and the options released without a session");
        {
            let so = options(ort, 1);
            register_v2(ort, &so, &d.lib).unwrap_or_else(|e| panic!("RegisterCustomOpsLibrary_V2: {e:?}"));
            assert!(cache_stats(&d.lib).is_some(), "libdynq.so is not loaded after its registration");
            drop(so);
            // ONNX Runtime closes the library with the options; it is unloaded unless a thread
            // that ran dynq's GEMM is alive (a thread-local buffer's destructor keeps it): none
            // has yet, so the next step loads it again.
            let loaded = cache_stats(&d.lib).is_some();
            println!("ort_c_api: libdynq.so {} loaded", if loaded { "still" } else { "no longer" });
        }

        println!("ort_c_api: step: RegisterCustomOpsLibrary_V2");
        let cosine = register_and_run(ort, &env, &d, "RegisterCustomOpsLibrary_V2");
        println!("ort_c_api: V2: bit-identical to the Python API, cosine with fp32 {cosine:.6}");

        println!("ort_c_api: step: RegisterCustomOpsLibrary (library handle kept by the caller)");
        {
            let so = options(ort, 1);
            let handle =
                register_legacy(ort, &so, &d.lib).unwrap_or_else(|e| panic!("RegisterCustomOpsLibrary: {e:?}"));
            let s = session(ort, &env, &so, &d.model("dq.onnx")).unwrap_or_else(|e| panic!("CreateSession: {e:?}"));
            let (dims, y) = run(ort, s.ptr, &d.x, d.rows, d.k).unwrap_or_else(|e| panic!("Run: {e:?}"));
            d.check("RegisterCustomOpsLibrary", &dims, &y);
            assert_eq!(cache_stats_from(handle.0)[0], 2, "packed weights alive with the session");
            // Session, then its options, then the library they use.
            drop(s);
            drop(so);
            assert_eq!(cache_stats_from(handle.0)[0], 0, "packed weights left after the session was released");
            drop(handle);
        }

        println!("ort_c_api: step: the library registered twice in one session options");
        {
            let so = options(ort, 1);
            register_v2(ort, &so, &d.lib).unwrap_or_else(|e| panic!("first RegisterCustomOpsLibrary_V2: {e:?}"));
            register_v2(ort, &so, &d.lib).unwrap_or_else(|e| panic!("second RegisterCustomOpsLibrary_V2: {e:?}"));
            // dynq marks the options at the first registration and adds its domain only once
            // (two domains of one name make ONNX Runtime refuse every session).
            let s = session(ort, &env, &so, &d.model("dq.onnx"))
                .unwrap_or_else(|e| panic!("CreateSession after registering twice: {e:?}"));
            let (dims, y) = run(ort, s.ptr, &d.x, d.rows, d.k).unwrap_or_else(|e| panic!("Run: {e:?}"));
            d.check("registered twice", &dims, &y);
        }

        println!("ort_c_api: step: two session options, two sessions at once");
        {
            let before = cache_stats(&d.lib).map(|s| s[2]);
            let so1 = options(ort, 1);
            register_v2(ort, &so1, &d.lib).unwrap_or_else(|e| panic!("RegisterCustomOpsLibrary_V2: {e:?}"));
            let so2 = options(ort, 2);
            let handle =
                register_legacy(ort, &so2, &d.lib).unwrap_or_else(|e| panic!("RegisterCustomOpsLibrary: {e:?}"));
            let s1 = session(ort, &env, &so1, &d.model("dq.onnx")).unwrap_or_else(|e| panic!("CreateSession 1: {e:?}"));
            let s2 = session(ort, &env, &so2, &d.model("dq.onnx")).unwrap_or_else(|e| panic!("CreateSession 2: {e:?}"));
            let [live, _, hits, _] = cache_stats_from(handle.0);
            assert_eq!(live, 2, "the two sessions share their packed weights");
            if let Some(before) = before {
                assert!(
                    hits >= before + 2,
                    "the second session's weights came from the cache ({before} -> {hits} hits)"
                );
            }
            struct Sessions([*mut OrtSession; 2]);
            // SAFETY: OrtApi::Run may be called concurrently on one session and on several.
            unsafe impl Sync for Sessions {}
            let sessions = Sessions([s1.ptr, s2.ptr]);
            std::thread::scope(|scope| {
                for t in 0..4 {
                    let (sessions, d) = (&sessions, &d);
                    scope.spawn(move || {
                        for i in 0..8 {
                            let s = sessions.0[(t + i) % 2];
                            let (dims, y) = run(ort, s, &d.x, d.rows, d.k).unwrap_or_else(|e| panic!("Run: {e:?}"));
                            d.check("two sessions at once", &dims, &y);
                        }
                    });
                }
            });
            // One session released, the other still runs on the shared weights.
            drop(s1);
            drop(so1);
            let (dims, y) = run(ort, s2.ptr, &d.x, d.rows, d.k).unwrap_or_else(|e| panic!("Run: {e:?}"));
            d.check("after the other session was released", &dims, &y);
            drop(s2);
            drop(so2);
            assert_eq!(cache_stats_from(handle.0)[0], 0, "packed weights left after both sessions were released");
            drop(handle);
        }

        println!("ort_c_api: step: errors");
        {
            let missing = d.work.join("no-such-directory/libdynq-missing.so");
            let so = options(ort, 1);
            let (_, msg) = expect_err(register_v2(ort, &so, &missing), "RegisterCustomOpsLibrary_V2 of a missing file");
            assert!(msg.contains("libdynq-missing.so"), "the message names the library: {msg}");
            let (_, msg) =
                expect_err(register_legacy(ort, &so, &missing), "RegisterCustomOpsLibrary of a missing file");
            assert!(msg.contains("libdynq-missing.so"), "the message names the library: {msg}");
            // The options are still usable after the failed registrations.
            register_v2(ort, &so, &d.lib)
                .unwrap_or_else(|e| panic!("RegisterCustomOpsLibrary_V2 after a failure: {e:?}"));
            // ONNX Runtime ignores the status of a custom op's shape inference (dynq's refuses this
            // model too): the message comes from the kernel's creation, wrapped as an exception.
            let (_, msg) = expect_err(session(ort, &env, &so, &d.model("bad_w_dtype.onnx")), "a float weight");
            assert!(msg.contains("dq_bad") && msg.contains("int8"), "the message names the node and the type: {msg}");
            let (_, msg) = expect_err(session(ort, &env, &so, &d.model("bad_attr.onnx")), "an unknown act_type");
            assert!(msg.contains("dq_bad") && msg.contains("bogus"), "the message names the node and value: {msg}");
            let s = session(ort, &env, &so, &d.model("dq.onnx")).unwrap_or_else(|e| panic!("CreateSession: {e:?}"));
            let mut x = d.x.clone();
            x[2 * d.k + 5] = f32::NAN;
            let (_, msg) = expect_err(run(ort, s.ptr, &x, d.rows, d.k), "a NaN activation");
            assert!(msg.contains("DynQMatMul") && msg.contains("A[2][5]"), "the message names the element: {msg}");
            // The session still runs good inputs.
            let (dims, y) =
                run(ort, s.ptr, &d.x, d.rows, d.k).unwrap_or_else(|e| panic!("Run after a failed run: {e:?}"));
            d.check("after a failed run", &dims, &y);
        }

        println!("ort_c_api: step: registering again after everything was released");
        // This thread ran dynq's GEMM (1 intra-op thread): expected to be still loaded.
        let loaded = cache_stats(&d.lib).is_some();
        println!("ort_c_api: libdynq.so {} loaded after all releases", if loaded { "still" } else { "no longer" });
        register_and_run(ort, &env, &d, "registered again");
        drop(env);
        println!("{DONE}");
    }
}
