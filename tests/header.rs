//! include/dynq.h must be exactly what cbindgen generates from src/ffi.
//! Run with DYNQ_BLESS=1 to rewrite the checked-in header after changing the C ABI.

use std::path::Path;

#[test]
fn header_is_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(root)
        .with_config(config)
        .generate()
        .expect("cbindgen failed")
        .write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    let path = root.join("include/dynq.h");
    if std::env::var_os("DYNQ_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == generated,
        "include/dynq.h is stale: regenerate it with `DYNQ_BLESS=1 cargo test --test header` and commit it"
    );
    assert!(generated.contains(&format!("#define DYNQ_VERSION_STRING \"{}\"", env!("CARGO_PKG_VERSION"))));
}
