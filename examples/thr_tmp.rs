use dynq::*;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let v: Vec<usize> = args[1].split('x').map(|x| x.parse().unwrap()).collect();
    let (m, n, k) = (v[0], v[1], v[2]);
    let mut seed = 1u64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
    let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
    let pw = PackedWeights::from_f32(&w, n, k, WeightLayout::NK, PackOptions::default()).unwrap();
    let mut y = vec![0f32; m * n];
    let med = |mut s: Vec<f64>| {
        s.sort_by(|a, b| a.partial_cmp(b).unwrap());
        s[s.len() / 2]
    };
    let run = |t: usize, y: &mut Vec<f32>| {
        let s = std::time::Instant::now();
        gemm(&pw, &a, m, k, None, y, n, &GemmOptions { num_threads: t, ..Default::default() }).unwrap();
        s.elapsed().as_secs_f64() * 1e3
    };
    for round in 0..3 {
        let (mut a1, mut a2, mut b1, mut b2) = (vec![], vec![], vec![], vec![]);
        for _ in 0..300 {
            a1.push(run(1, &mut y));
            a2.push(run(2, &mut y));
        }
        for _ in 0..300 {
            b1.push(run(1, &mut y));
        }
        for _ in 0..300 {
            b2.push(run(2, &mut y));
        }
        let (a1, a2, b1, b2) = (med(a1), med(a2), med(b1), med(b2));
        println!("round {round} {m}x{n}x{k}: interleaved 1T {a1:.3} 2T {a2:.3} ({:.2}x); back-to-back 1T {b1:.3} 2T {b2:.3} ({:.2}x)", a1 / a2, b1 / b2);
    }
}
