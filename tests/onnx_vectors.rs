//! dynq against ONNX's own backend node-test vectors for `DynamicQuantizeLinear` and
//! `MatMulInteger` (tests/data/onnx_node_vectors.json, written by tools/gen_onnx_vectors.py
//! from `onnx.backend.test.case.node.collect_testcases`; no Python is needed here).
//!
//! - DynamicQuantizeLinear: `quantize_activations_with(.., PerTensor, AsymmetricU8, ..)`, with the
//!   row operations of every kernel this CPU runs, must give
//!   exactly ONNX's `y` (uint8), `y_scale` (f32, bit for bit) and `y_zero_point`.
//! - MatMulInteger: `gemm_i32` must give exactly ONNX's int32 `Y`, for every kernel of this
//!   build the CPU can run. dynq's weights are symmetric int8 without zero point, so B is
//!   given as `B - b_zero_point` (which must fit int8; a case where it does not fails).
//!
//! The ISAs come from `common::isas_under_test`: every kernel of this build the CPU can run;
//! `DYNQ_REQUIRE_ISA=avx512_vnni,avx2` (or `all`) turns the skip of an ISA the CPU lacks into a
//! failure.

mod common;

use dynq::kernels::kernel_for;
use dynq::quant::activations::{quantize_activations_with, ActGranularity, ActType};
use dynq::{gemm_i32, PackOptions, PackedWeights, WeightLayout};
use std::collections::BTreeSet;

const VECTORS: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/onnx_node_vectors.json"));

/// Cases that must be present and checked, whatever else the file holds.
const REQUIRED_DQL: &[&str] = &[
    "test_dynamicquantizelinear",
    "test_dynamicquantizelinear_max_adjusted",
    "test_dynamicquantizelinear_min_adjusted",
];
const REQUIRED_MMI: &[&str] = &["test_matmulinteger"];

// ---------------------------------------------------------------------------------------------
// A minimal JSON reader (numbers are kept as their source text so integers and f32 decimals
// are parsed exactly by the caller).

mod json {
    #[derive(Debug, Clone)]
    pub enum Value {
        Null,
        Bool(bool),
        Num(String),
        Str(String),
        Arr(Vec<Value>),
        Obj(Vec<(String, Value)>),
    }

    impl Value {
        pub fn get(&self, key: &str) -> Option<&Value> {
            match self {
                Value::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
                _ => None,
            }
        }
        /// The member `key` of an object; panics (naming `ctx`) if absent.
        pub fn at(&self, key: &str, ctx: &str) -> &Value {
            self.get(key).unwrap_or_else(|| panic!("{ctx}: missing key {key:?}"))
        }
        pub fn arr(&self, ctx: &str) -> &[Value] {
            match self {
                Value::Arr(a) => a,
                v => panic!("{ctx}: expected an array, got {v:?}"),
            }
        }
        pub fn str(&self, ctx: &str) -> &str {
            match self {
                Value::Str(s) => s,
                v => panic!("{ctx}: expected a string, got {v:?}"),
            }
        }
        pub fn bool(&self, ctx: &str) -> bool {
            match self {
                Value::Bool(b) => *b,
                v => panic!("{ctx}: expected a boolean, got {v:?}"),
            }
        }
        pub fn int(&self, ctx: &str) -> i64 {
            match self {
                Value::Num(s) => s.parse().unwrap_or_else(|_| panic!("{ctx}: {s:?} is not an integer")),
                v => panic!("{ctx}: expected an integer, got {v:?}"),
            }
        }
    }

    pub fn parse(text: &str) -> Value {
        let mut p = Parser { s: text.as_bytes(), i: 0 };
        let v = p.value();
        p.ws();
        assert!(p.i == p.s.len(), "JSON: trailing data at byte {}", p.i);
        v
    }

    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl Parser<'_> {
        fn ws(&mut self) {
            while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
                self.i += 1;
            }
        }
        fn peek(&self) -> u8 {
            *self.s.get(self.i).unwrap_or_else(|| panic!("JSON: unexpected end of input"))
        }
        fn expect(&mut self, c: u8) {
            self.ws();
            assert!(
                self.peek() == c,
                "JSON: expected {:?} at byte {}, found {:?}",
                c as char,
                self.i,
                self.peek() as char
            );
            self.i += 1;
        }
        fn lit(&mut self, word: &str, v: Value) -> Value {
            assert!(self.s[self.i..].starts_with(word.as_bytes()), "JSON: bad literal at byte {}", self.i);
            self.i += word.len();
            v
        }
        fn value(&mut self) -> Value {
            self.ws();
            match self.peek() {
                b'{' => {
                    self.i += 1;
                    let mut m = Vec::new();
                    self.ws();
                    if self.peek() == b'}' {
                        self.i += 1;
                        return Value::Obj(m);
                    }
                    loop {
                        self.ws();
                        let k = self.string();
                        self.expect(b':');
                        let v = self.value();
                        m.push((k, v));
                        self.ws();
                        match self.peek() {
                            b',' => self.i += 1,
                            b'}' => {
                                self.i += 1;
                                return Value::Obj(m);
                            }
                            c => panic!("JSON: expected ',' or '}}' at byte {}, found {:?}", self.i, c as char),
                        }
                    }
                }
                b'[' => {
                    self.i += 1;
                    let mut a = Vec::new();
                    self.ws();
                    if self.peek() == b']' {
                        self.i += 1;
                        return Value::Arr(a);
                    }
                    loop {
                        a.push(self.value());
                        self.ws();
                        match self.peek() {
                            b',' => self.i += 1,
                            b']' => {
                                self.i += 1;
                                return Value::Arr(a);
                            }
                            c => panic!("JSON: expected ',' or ']' at byte {}, found {:?}", self.i, c as char),
                        }
                    }
                }
                b'"' => Value::Str(self.string()),
                b't' => self.lit("true", Value::Bool(true)),
                b'f' => self.lit("false", Value::Bool(false)),
                b'n' => self.lit("null", Value::Null),
                b'-' | b'0'..=b'9' => {
                    let start = self.i;
                    while self.i < self.s.len()
                        && matches!(self.s[self.i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                    {
                        self.i += 1;
                    }
                    Value::Num(std::str::from_utf8(&self.s[start..self.i]).unwrap().to_string())
                }
                c => panic!("JSON: unexpected {:?} at byte {}", c as char, self.i),
            }
        }
        fn string(&mut self) -> String {
            self.expect(b'"');
            let mut out = String::new();
            loop {
                let c = self.peek();
                self.i += 1;
                match c {
                    b'"' => return out,
                    b'\\' => {
                        let e = self.peek();
                        self.i += 1;
                        match e {
                            b'"' => out.push('"'),
                            b'\\' => out.push('\\'),
                            b'/' => out.push('/'),
                            b'b' => out.push('\u{8}'),
                            b'f' => out.push('\u{c}'),
                            b'n' => out.push('\n'),
                            b'r' => out.push('\r'),
                            b't' => out.push('\t'),
                            b'u' => {
                                let hex = std::str::from_utf8(&self.s[self.i..self.i + 4]).unwrap();
                                self.i += 4;
                                // The generator writes ASCII only; \u escapes outside the BMP's
                                // non-surrogate range are not needed.
                                let cp = u32::from_str_radix(hex, 16).expect("JSON: bad \\u escape");
                                out.push(char::from_u32(cp).expect("JSON: surrogate \\u escape"));
                            }
                            e => panic!("JSON: bad escape \\{}", e as char),
                        }
                    }
                    _ => {
                        // Copy one UTF-8 sequence.
                        let start = self.i - 1;
                        let len = match c {
                            0x00..=0x7f => 1,
                            0xc0..=0xdf => 2,
                            0xe0..=0xef => 3,
                            _ => 4,
                        };
                        self.i = start + len;
                        out.push_str(std::str::from_utf8(&self.s[start..self.i]).expect("JSON: invalid UTF-8"));
                    }
                }
            }
        }
    }
}

use json::Value;

// ---------------------------------------------------------------------------------------------
// Tensors of the vector file.

#[derive(Debug)]
struct Tensor {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    /// Integer tensors.
    ints: Vec<i64>,
    /// float32 tensors, from their bit patterns.
    floats: Vec<f32>,
}

impl Tensor {
    fn from_json(v: &Value, ctx: &str) -> Tensor {
        let name = v.at("name", ctx).str(ctx).to_string();
        let ctx = &format!("{ctx} tensor {name:?}");
        let dtype = v.at("dtype", ctx).str(ctx).to_string();
        let shape: Vec<usize> = v.at("shape", ctx).arr(ctx).iter().map(|d| d.int(ctx) as usize).collect();
        let len: usize = shape.iter().product();
        let data = v.at("data", ctx).arr(ctx);
        assert_eq!(data.len(), len, "{ctx}: {} values for shape {shape:?}", data.len());
        let (mut ints, mut floats) = (Vec::new(), Vec::new());
        match dtype.as_str() {
            "float32" => {
                let bits = v.at("bits", ctx).arr(ctx);
                assert_eq!(bits.len(), len, "{ctx}: {} bit patterns for shape {shape:?}", bits.len());
                for (i, (b, d)) in bits.iter().zip(data).enumerate() {
                    let b = u32::try_from(b.int(ctx)).unwrap_or_else(|_| panic!("{ctx}: bits[{i}] is not a u32"));
                    let x = f32::from_bits(b);
                    // The decimal is for readers; it must agree with the authoritative bits.
                    let dec: f32 = match d {
                        Value::Num(s) => s.parse().unwrap_or_else(|_| panic!("{ctx}: data[{i}] = {s:?}")),
                        Value::Str(s) if s == "nan" => f32::NAN,
                        Value::Str(s) if s == "inf" => f32::INFINITY,
                        Value::Str(s) if s == "-inf" => f32::NEG_INFINITY,
                        d => panic!("{ctx}: data[{i}] = {d:?}"),
                    };
                    assert!(
                        dec.to_bits() == b || (dec.is_nan() && x.is_nan()),
                        "{ctx}: data[{i}] = {d:?} disagrees with bits[{i}] = {b:#010x} ({x:?})"
                    );
                    floats.push(x);
                }
            }
            "uint8" | "int8" | "int32" | "uint32" | "int64" => {
                let (lo, hi) = match dtype.as_str() {
                    "uint8" => (0, 255),
                    "int8" => (-128, 127),
                    "int32" => (i32::MIN as i64, i32::MAX as i64),
                    "uint32" => (0, u32::MAX as i64),
                    _ => (i64::MIN, i64::MAX),
                };
                for (i, d) in data.iter().enumerate() {
                    let x = d.int(ctx);
                    assert!((lo..=hi).contains(&x), "{ctx}: data[{i}] = {x} is out of range for {dtype}");
                    ints.push(x);
                }
            }
            other => panic!("{ctx}: dtype {other} is not handled by this test"),
        }
        Tensor { name, dtype, shape, ints, floats }
    }

    fn len(&self) -> usize {
        self.shape.iter().product()
    }

    fn expect_dtype(&self, case: &str, dtypes: &[&str]) {
        assert!(
            dtypes.contains(&self.dtype.as_str()),
            "{case}: tensor {:?} has dtype {}, expected one of {dtypes:?}",
            self.name,
            self.dtype
        );
    }
}

struct DataSet {
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
}

struct Case {
    name: String,
    op: String,
    data_sets: Vec<DataSet>,
}

struct Vectors {
    onnx_version: String,
    cases: Vec<Case>,
}

fn load() -> Vectors {
    let root = json::parse(VECTORS);
    let ctx = "onnx_node_vectors.json";
    let format = root.at("format", ctx).int(ctx);
    assert_eq!(format, 1, "{ctx}: unknown format version {format}; update tests/onnx_vectors.rs");
    let onnx_version = root.at("onnx_version", ctx).str(ctx).to_string();
    let cases = root
        .at("cases", ctx)
        .arr(ctx)
        .iter()
        .map(|c| {
            let name = c.at("name", ctx).str(ctx).to_string();
            let ctx = &name;
            let op = c.at("op", ctx).str(ctx).to_string();
            let expanded = c.at("expanded", ctx).bool(ctx);
            if !expanded {
                // Attributes would change the semantics; none are defined for these ops today.
                match c.at("attributes", ctx) {
                    Value::Obj(m) if m.is_empty() => {}
                    a => panic!("{ctx}: node attributes {a:?} are not handled by this test"),
                }
            }
            let data_sets = c
                .at("data_sets", ctx)
                .arr(ctx)
                .iter()
                .enumerate()
                .map(|(i, ds)| {
                    let ctx = &format!("{name} data set {i}");
                    let tensors = |key: &str| -> Vec<Tensor> {
                        ds.at(key, ctx).arr(ctx).iter().map(|t| Tensor::from_json(t, &format!("{ctx} {key}"))).collect()
                    };
                    DataSet { inputs: tensors("inputs"), outputs: tensors("outputs") }
                })
                .collect::<Vec<_>>();
            assert!(!data_sets.is_empty(), "{name}: no data sets");
            Case { name, op, data_sets }
        })
        .collect();
    Vectors { onnx_version, cases }
}

fn assert_all_required_checked(op: &str, checked: &BTreeSet<String>, required: &[&str], v: &Vectors) {
    assert!(!checked.is_empty(), "no {op} case was checked (onnx {})", v.onnx_version);
    for r in required {
        assert!(checked.contains(*r), "{op} case {r} is missing from the vector file (onnx {})", v.onnx_version);
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn every_case_is_a_known_op() {
    let v = load();
    assert!(!v.cases.is_empty(), "the vector file holds no cases");
    for c in &v.cases {
        assert!(
            c.op == "DynamicQuantizeLinear" || c.op == "MatMulInteger",
            "{}: op {} has no checker in tests/onnx_vectors.rs",
            c.name,
            c.op
        );
    }
}

#[test]
fn dynamic_quantize_linear_matches_onnx() {
    let v = load();
    let mut checked = BTreeSet::new();
    let mut layouts_checked = 0usize;
    for case in v.cases.iter().filter(|c| c.op == "DynamicQuantizeLinear") {
        for (d, ds) in case.data_sets.iter().enumerate() {
            let name = format!("{} (data set {d})", case.name);
            assert_eq!(ds.inputs.len(), 1, "{name}: DynamicQuantizeLinear has one input");
            assert_eq!(ds.outputs.len(), 3, "{name}: DynamicQuantizeLinear has three outputs");
            let x = &ds.inputs[0];
            let (y, y_scale, y_zp) = (&ds.outputs[0], &ds.outputs[1], &ds.outputs[2]);
            x.expect_dtype(&name, &["float32"]);
            y.expect_dtype(&name, &["uint8"]);
            y_scale.expect_dtype(&name, &["float32"]);
            y_zp.expect_dtype(&name, &["uint8"]);
            assert_eq!(x.shape, y.shape, "{name}: y has the shape of x");
            assert_eq!((y_scale.len(), y_zp.len()), (1, 1), "{name}: y_scale and y_zero_point are scalars");
            let (exp_scale, exp_zp) = (y_scale.floats[0], y_zp.ints[0] as i32);
            let len = x.len();
            assert!(len > 0, "{name}: empty input");

            // Per tensor, the row split must not matter: 1 x len, len x 1, and the natural
            // rows x last-dim split, each also with a row stride and padded output rows.
            let mut layouts = vec![(1, len), (len, 1)];
            if x.shape.len() >= 2 {
                let k = *x.shape.last().unwrap();
                layouts.push((len / k, k));
            }
            for (m, k) in layouts {
                for padded in [false, true] {
                    let (lda, kp, rows) = if padded { (k + 3, k.div_ceil(4) * 4 + 4, m + 2) } else { (k, k, m) };
                    // Stride gaps hold a large value that would change the range if it were read.
                    let mut a = vec![1.0e30f32; (m - 1) * lda + k];
                    for i in 0..m {
                        a[i * lda..i * lda + k].copy_from_slice(&x.floats[i * k..(i + 1) * k]);
                    }
                    for isa in common::isas_under_test() {
                        let kern = dynq::kernels::kernel_for(isa).unwrap();
                        let ab = kern.a_bytes;
                        let what = format!("{name}, as {m} x {k} (lda {lda}, kp {kp}, rows {rows}), {isa} row ops");
                        let q = quantize_activations_with(
                            kern.ops,
                            ab,
                            &a,
                            m,
                            k,
                            lda,
                            ActGranularity::PerTensor,
                            ActType::AsymmetricU8,
                            kp,
                            rows,
                        )
                        .unwrap_or_else(|e| panic!("{what}: quantize_activations failed: {e:?}"));
                        assert_eq!(q.scales.len(), m, "{what}: one scale per row");
                        assert_eq!(q.zero_points.len(), m, "{what}: one zero point per row");
                        for i in 0..m {
                            assert!(
                                q.scales[i].to_bits() == exp_scale.to_bits(),
                                "{what}: y_scale (row {i}) is {:e} ({:#010x}), ONNX expects {:e} ({:#010x})",
                                q.scales[i],
                                q.scales[i].to_bits(),
                                exp_scale,
                                exp_scale.to_bits()
                            );
                            assert!(
                                q.zero_points[i] == exp_zp,
                                "{what}: y_zero_point (row {i}) is {}, ONNX expects {exp_zp}",
                                q.zero_points[i]
                            );
                        }
                        for e in 0..len {
                            let (i, j) = (e / k, e % k);
                            let got = q.data[i * q.row_bytes + j * ab];
                            assert!(
                                got as i64 == y.ints[e],
                                "{what}: y[{e}] (x = {:e}, bits {:#010x}) is {got}, ONNX expects {}",
                                x.floats[e],
                                x.floats[e].to_bits(),
                                y.ints[e]
                            );
                        }
                    }
                    layouts_checked += 1;
                }
            }
        }
        checked.insert(case.name.clone());
    }
    assert_all_required_checked("DynamicQuantizeLinear", &checked, REQUIRED_DQL, &v);
    eprintln!(
        "DynamicQuantizeLinear: {} ONNX {} cases checked in {layouts_checked} layouts: {}",
        checked.len(),
        v.onnx_version,
        checked.iter().cloned().collect::<Vec<_>>().join(", ")
    );
}

/// One MatMulInteger case in dynq's terms.
struct MatMulCase {
    m: usize,
    k: usize,
    n: usize,
    /// `m x k` row-major u8 activations and one zero point per row.
    qa: Vec<u8>,
    za: Vec<i32>,
    /// `B - b_zero_point` as int8, `[K][N]` row-major.
    qb: Vec<i8>,
    expected: Vec<i32>,
}

// Index loops read as the matrix definitions they implement.
#[allow(clippy::needless_range_loop)]
fn convert_matmul_integer(name: &str, ds: &DataSet) -> MatMulCase {
    assert!((2..=4).contains(&ds.inputs.len()), "{name}: MatMulInteger has 2 to 4 inputs, got {}", ds.inputs.len());
    assert_eq!(ds.outputs.len(), 1, "{name}: MatMulInteger has one output");
    let (a, b) = (&ds.inputs[0], &ds.inputs[1]);
    let (a_zp, b_zp) = (ds.inputs.get(2), ds.inputs.get(3));
    let y = &ds.outputs[0];
    a.expect_dtype(name, &["uint8", "int8"]);
    b.expect_dtype(name, &["uint8", "int8"]);
    y.expect_dtype(name, &["int32"]);

    // Shapes (numpy matmul rules): A [..., M, K] with leading dims folded into M; A 1-D is
    // [1, K]. B must be 2-D [K, N] (or 1-D [K], i.e. N = 1): dynq has no batched weights.
    let k = *a.shape.last().unwrap_or_else(|| panic!("{name}: A is a scalar"));
    let m = a.len() / k.max(1);
    let (kb, n) = match b.shape.as_slice() {
        [kb, n] => (*kb, *n),
        [kb] => (*kb, 1),
        s => panic!(
            "{name}: B has shape {s:?}; dynq multiplies by one 2-D weight matrix, so a batched \
             (N-D) B cannot be represented. Extend this test if ONNX adds such a case."
        ),
    };
    assert_eq!(kb, k, "{name}: A is {:?} but B is {:?}", a.shape, b.shape);
    assert_eq!(y.len(), m * n, "{name}: Y has shape {:?}, expected {m} x {n} elements", y.shape);

    // a_zero_point: a scalar (per tensor) or, for a 2-D A, an M-vector (per row).
    let za_onnx: Vec<i64> = match a_zp {
        None => vec![0; m],
        Some(z) => {
            z.expect_dtype(name, &[a.dtype.as_str()]);
            if z.len() == 1 {
                vec![z.ints[0]; m]
            } else if a.shape.len() == 2 && z.len() == m {
                z.ints.clone()
            } else {
                panic!("{name}: a_zero_point of shape {:?} for A of shape {:?} is not handled", z.shape, a.shape)
            }
        }
    };
    // b_zero_point: a scalar (per tensor) or an N-vector (per column).
    let zb_onnx: Vec<i64> = match b_zp {
        None => vec![0; n],
        Some(z) => {
            z.expect_dtype(name, &[b.dtype.as_str()]);
            if z.len() == 1 {
                vec![z.ints[0]; n]
            } else if z.len() == n {
                z.ints.clone()
            } else {
                panic!("{name}: b_zero_point of shape {:?} for B of shape {:?} is not handled", z.shape, b.shape)
            }
        }
    };

    // The vector itself must follow the MatMulInteger definition (checked in i64 from the
    // original tensors), so that a failure below can only be dynq's.
    for i in 0..m {
        for j in 0..n {
            let r: i64 = (0..k).map(|kk| (a.ints[i * k + kk] - za_onnx[i]) * (b.ints[kk * n + j] - zb_onnx[j])).sum();
            assert_eq!(
                r,
                y.ints[i * n + j],
                "{name}: the ONNX vector is inconsistent with the MatMulInteger definition at Y[{i}][{j}]"
            );
        }
    }

    // A: dynq takes u8 with a zero point in 0..=255. An int8 A shifts exactly by +128
    // (A - za is unchanged).
    let shift = if a.dtype == "int8" { 128 } else { 0 };
    let qa = a.ints.iter().map(|&v| (v + shift) as u8).collect();
    let za = za_onnx.iter().map(|&z| (z + shift) as i32).collect();

    // B: dynq's weights are int8 without zero point, so B - b_zero_point must fit int8.
    let mut qb = Vec::with_capacity(k * n);
    for kk in 0..k {
        for j in 0..n {
            let d = b.ints[kk * n + j] - zb_onnx[j];
            let q = i8::try_from(d).unwrap_or_else(|_| {
                panic!(
                    "{name}: B[{kk}][{j}] - b_zero_point[{j}] = {} - {} = {d} does not fit int8. dynq's \
                     packed weights are symmetric int8 without a zero point, so this MatMulInteger \
                     case cannot be represented exactly; it is a real limitation, not a test bug.",
                    b.ints[kk * n + j],
                    zb_onnx[j]
                )
            });
            qb.push(q);
        }
    }
    MatMulCase { m, k, n, qa, za, qb, expected: y.ints.iter().map(|&v| v as i32).collect() }
}

#[test]
fn matmul_integer_matches_onnx() {
    let v = load();
    let isas = common::isas_under_test();
    let mut checked = BTreeSet::new();
    let mut runs = 0usize;
    for case in v.cases.iter().filter(|c| c.op == "MatMulInteger") {
        let mut case_runs = 0usize;
        for (d, ds) in case.data_sets.iter().enumerate() {
            let name = format!("{} (data set {d})", case.name);
            let mc = convert_matmul_integer(&name, ds);
            for &isa in &isas {
                let kern = kernel_for(isa).expect("isas_under_test() lists ISAs with kernels");
                let opts = PackOptions { isa: Some(isa), ..Default::default() };
                let w = PackedWeights::from_quantized(&mc.qb, mc.n, mc.k, WeightLayout::KN, &[1.0], opts)
                    .unwrap_or_else(|e| panic!("{name} [{isa}]: packing failed: {e:?}"));
                assert_eq!(w.isa(), isa, "{name}: weights packed for the wrong ISA");
                for threads in [1, 2] {
                    let mut out = vec![i32::MIN; mc.m * mc.n];
                    gemm_i32(&w, &mc.qa, mc.m, mc.k, &mc.za, &mut out, mc.n, threads)
                        .unwrap_or_else(|e| panic!("{name} [{isa}, {threads} threads]: gemm_i32 failed: {e:?}"));
                    for (e, (&got, &exp)) in out.iter().zip(&mc.expected).enumerate() {
                        assert!(
                            got == exp,
                            "{name} [{isa} kernel {}, {threads} threads]: Y[{}][{}] is {got}, ONNX expects {exp}",
                            kern.name,
                            e / mc.n,
                            e % mc.n
                        );
                    }
                    runs += 1;
                    case_runs += 1;
                }
            }
        }
        assert!(case_runs > 0, "{}: no kernel could run it", case.name);
        checked.insert(case.name.clone());
    }
    assert_all_required_checked("MatMulInteger", &checked, REQUIRED_MMI, &v);
    assert!(runs > 0, "no MatMulInteger run happened");
    eprintln!(
        "MatMulInteger: {} ONNX {} cases checked in {runs} runs (kernels: {}): {}",
        checked.len(),
        v.onnx_version,
        isas.iter().map(|&i| kernel_for(i).unwrap().name).collect::<Vec<_>>().join(", "),
        checked.iter().cloned().collect::<Vec<_>>().join(", ")
    );
}
