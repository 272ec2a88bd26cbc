//! Gives the shared library a SONAME (libdynq.so.<major>), so programs linked against it
//! record the ABI they were built for instead of an absolute path.
fn main() {
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap();
    let minor = std::env::var("CARGO_PKG_VERSION_MINOR").unwrap();
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os == "linux" {
        // Before 1.0 every minor version may break the ABI, so it is part of the SONAME.
        let soname = if major == "0" { format!("libdynq.so.0.{minor}") } else { format!("libdynq.so.{major}") };
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,{soname}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
