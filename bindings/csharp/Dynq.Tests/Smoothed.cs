// Tests of GemmSmoothed (dynq_gemm_smoothed): bit for bit the float Gemm on the activations
// multiplied by the factors in float, for every pair of element types, on arrays and spans;
// without factors (null, empty) the plain Gemm; bad factors refused by the library with its
// message and y untouched; lengths refused by the binding with ArgumentException.
using System;

namespace Dynq.Tests
{
    internal static partial class Program
    {
        // m rows of k values whose channels have very different ranges (2^-3 to 2^5), as in the
        // layers smoothing is for.
        private static float[] OutlierActivations(Random r, int m, int k, float scale)
        {
            float[] range = new float[k];
            for (int j = 0; j < k; j++) range[j] = (float)Math.Pow(2, r.NextDouble() * 8 - 3) * scale;
            float[] a = new float[m * k];
            for (int i = 0; i < a.Length; i++) a[i] = (float)(r.NextDouble() * 2 - 1) * range[i % k];
            return a;
        }

        // k positive factors in [1/8, 8], not powers of two, so that the products round.
        private static float[] SmoothingFactors(Random r, int k)
        {
            float[] s = new float[k];
            for (int j = 0; j < k; j++) s[j] = (float)Math.Pow(2, r.NextDouble() * 6 - 3);
            return s;
        }

        // a times smooth[column], each product rounded to float: what GemmSmoothed quantizes. The
        // product of two floats is exact in double, so the cast rounds once, as one float
        // multiplication does.
        private static float[] Smoothed(float[] a, float[] smooth)
        {
            float[] v = new float[a.Length];
            for (int i = 0; i < a.Length; i++) v[i] = (float)((double)a[i] * smooth[i % smooth.Length]);
            return v;
        }

        // GemmSmoothed on every pair of element types equals the float Gemm on the (widened)
        // activations times the factors, rounded to the output type, bit for bit.
        private static void TestGemmSmoothedMatchesGemm()
        {
            GemmExCase[] cases =
            {
                new GemmExCase("smoothed 1x1x1", 1, 1, 1, scaleW: 1f),
                new GemmExCase("smoothed defaults", 3, 17, 33),
                new GemmExCase("smoothed, no bias, per-tensor symmetric", 5, 24, 48, bias: false, scaleA: 2f,
                    options: new GemmOptions { ActGranularity = ActGranularity.PerTensor, ActType = ActType.SymmetricI8 }),
                new GemmExCase("smoothed, relu, two threads", 9, 40, 130, scaleA: 0.5f,
                    options: new GemmOptions { Epilogue = Epilogue.Relu, NumThreads = 2 }),
                new GemmExCase("smoothed, gelu", 6, 24, 40, scaleW: 1f, options: new GemmOptions { Epilogue = Epilogue.Gelu }),
                new GemmExCase("smoothed, zero rows", 0, 8, 16),
            };
            ElementType[] types = { ElementType.F32, ElementType.F16, ElementType.BF16 };
            int seed = 300, call = 0;
            foreach (GemmExCase c in cases)
            {
                Run(c.Name, () =>
                {
                    Random r = new Random(seed++);
                    using (PackedWeights p = PackedWeights.Pack(RandomArray(r, c.N * c.K, c.ScaleW, 0f), c.N, c.K))
                    {
                        float[] a32 = OutlierActivations(r, c.M, c.K, c.ScaleA);
                        float[] smooth = SmoothingFactors(r, c.K);
                        float[] bias = c.Bias ? RandomArray(r, c.N, 1f, 0f) : null;
                        ReadOnlySpan<float> biasSpan = bias == null ? ReadOnlySpan<float>.Empty : new ReadOnlySpan<float>(bias);
                        foreach (ElementType at in types)
                        {
                            foreach (ElementType yt in types)
                            {
                                string what = c.Name + ", " + at + " -> " + yt;
                                ushort[] a16 = at == ElementType.F32 ? null : Narrow(a32, at);
                                float[] wide = a16 == null ? a32 : Widen(a16, at);
                                float[] want32 = p.Forward(Smoothed(wide, smooth), bias, c.Options);
                                float[] plain32 = p.Forward(wide, bias, c.Options);
                                bool spans = call++ % 2 == 1; // arrays and spans in turn
                                float[] y32 = null;
                                ushort[] y16 = null;
                                if (yt == ElementType.F32)
                                {
                                    y32 = new float[c.M * c.N];
                                    if (at == ElementType.F32)
                                    {
                                        if (!spans) p.GemmSmoothed(a32, smooth, y32, bias, c.Options);
                                        else if (bias == null) p.GemmSmoothed(new ReadOnlySpan<float>(a32), smooth, new Span<float>(y32), c.Options);
                                        else p.GemmSmoothed(new ReadOnlySpan<float>(a32), smooth, new Span<float>(y32), biasSpan, c.Options);
                                    }
                                    else if (!spans) p.GemmSmoothed(a16, at, smooth, y32, bias, c.Options);
                                    else if (bias == null) p.GemmSmoothed(new ReadOnlySpan<ushort>(a16), at, smooth, new Span<float>(y32), c.Options);
                                    else p.GemmSmoothed(new ReadOnlySpan<ushort>(a16), at, smooth, new Span<float>(y32), biasSpan, c.Options);
                                    string diff = FirstDifference(y32, want32);
                                    Check(diff == null, what + ": GemmSmoothed equals Gemm on a times the factors: " + diff);
                                }
                                else
                                {
                                    y16 = new ushort[c.M * c.N];
                                    if (at == ElementType.F32)
                                    {
                                        if (!spans) p.GemmSmoothed(a32, smooth, y16, yt, bias, c.Options);
                                        else if (bias == null) p.GemmSmoothed(new ReadOnlySpan<float>(a32), smooth, new Span<ushort>(y16), yt, c.Options);
                                        else p.GemmSmoothed(new ReadOnlySpan<float>(a32), smooth, new Span<ushort>(y16), yt, biasSpan, c.Options);
                                    }
                                    else if (!spans) p.GemmSmoothed(a16, at, smooth, y16, yt, bias, c.Options);
                                    else if (bias == null) p.GemmSmoothed(new ReadOnlySpan<ushort>(a16), at, smooth, new Span<ushort>(y16), yt, c.Options);
                                    else p.GemmSmoothed(new ReadOnlySpan<ushort>(a16), at, smooth, new Span<ushort>(y16), yt, biasSpan, c.Options);
                                    string diff = FirstDifference(y16, Narrow(want32, yt));
                                    Check(diff == null, what + ": GemmSmoothed equals Gemm on a times the factors, rounded: " + diff);
                                }
                                if (c.M > 0)
                                {
                                    // The factors are applied: without them the result is another one.
                                    bool same = y32 != null ? FirstDifference(y32, plain32) == null
                                        : FirstDifference(y16, Narrow(plain32, yt)) == null;
                                    Check(!same, what + ": GemmSmoothed differs from Gemm without the factors");
                                }
                            }
                        }
                    }
                });
            }
        }

        // Without factors (null array, empty span), and with factors all 1, GemmSmoothed is Gemm.
        private static void TestGemmSmoothedWithoutFactors()
        {
            Random r = new Random(31);
            int n = 12, k = 40, m = 4;
            using (PackedWeights p = PackedWeights.Pack(RandomArray(r, n * k, 0.5f, 0f), n, k))
            {
                float[] a32 = OutlierActivations(r, m, k, 1f);
                float[] bias = RandomArray(r, n, 1f, 0f);
                float[] ones = new float[k];
                for (int j = 0; j < k; j++) ones[j] = 1f;
                GemmOptions options = new GemmOptions { ActType = ActType.SymmetricI8 };

                float[] want = p.Forward(a32, bias, options);
                float[] y = new float[m * n];
                p.GemmSmoothed(a32, null, y, bias, options);
                Check(FirstDifference(y, want) == null, "GemmSmoothed with null factors equals Gemm (float)");
                y = new float[m * n];
                p.GemmSmoothed(new ReadOnlySpan<float>(a32), ReadOnlySpan<float>.Empty, new Span<float>(y), bias, options);
                Check(FirstDifference(y, want) == null, "GemmSmoothed with empty factors equals Gemm (float)");
                y = new float[m * n];
                p.GemmSmoothed(a32, ones, y, bias, options);
                Check(FirstDifference(y, want) == null, "GemmSmoothed with factors 1 equals Gemm (float)");

                ushort[] a16 = Narrow(a32, ElementType.F16);
                foreach (ElementType yt in new[] { ElementType.F16, ElementType.BF16 })
                {
                    ushort[] want16 = new ushort[m * n];
                    p.Gemm(a16, ElementType.F16, want16, yt, bias, options);
                    foreach (float[] smooth in new[] { null, new float[0], ones })
                    {
                        string name = smooth == null ? "null" : smooth.Length == 0 ? "empty" : "1";
                        ushort[] y16 = new ushort[m * n];
                        p.GemmSmoothed(a16, ElementType.F16, smooth, y16, yt, bias, options);
                        Check(FirstDifference(y16, want16) == null,
                            "GemmSmoothed with " + name + " factors equals Gemm (F16 -> " + yt + ")");
                    }
                    float[] wantF = new float[m * n];
                    p.Gemm(a16, ElementType.F16, wantF, bias, options);
                    float[] yF = new float[m * n];
                    p.GemmSmoothed(a16, ElementType.F16, null, yF, bias, options);
                    Check(FirstDifference(yF, wantF) == null, "GemmSmoothed with null factors equals Gemm (F16 -> F32)");
                    ushort[] want16f = new ushort[m * n];
                    p.Gemm(a32, want16f, yt, bias, options);
                    ushort[] y16f = new ushort[m * n];
                    p.GemmSmoothed(a32, null, y16f, yt, bias, options);
                    Check(FirstDifference(y16f, want16f) == null, "GemmSmoothed with null factors equals Gemm (F32 -> " + yt + ")");
                }

                // Factors inside a larger buffer, as a span: only those K are read.
                float[] factors = SmoothingFactors(r, k);
                float[] big = new float[k + 5];
                for (int i = 0; i < big.Length; i++) big[i] = float.NaN;
                Array.Copy(factors, 0, big, 2, k);
                float[] wantS = new float[m * n];
                p.GemmSmoothed(a32, factors, wantS, bias);
                float[] gotS = new float[m * n];
                p.GemmSmoothed(new ReadOnlySpan<float>(a32), new ReadOnlySpan<float>(big, 2, k), new Span<float>(gotS), bias);
                Check(FirstDifference(gotS, wantS) == null, "GemmSmoothed with factors in a span of a larger buffer");
            }
        }

        private static void TestGemmSmoothedErrors()
        {
            Random r = new Random(5);
            using (PackedWeights p = PackedWeights.Pack(RandomArray(r, 6 * 4, 1f, 0f), 6, 4)) // N = 6, K = 4
            {
                const ElementType F16 = ElementType.F16, BF16 = ElementType.BF16;
                const string rule = "; smoothing factors must be positive and finite";
                Func<int, float, float[]> with = (j, v) =>
                {
                    float[] s = { 0.5f, 2f, 1.5f, 3f };
                    s[j] = v;
                    return s;
                };
                float[] good = { 0.5f, 2f, 1.5f, 3f };

                // Refused by the library, with its message.
                ExpectDynq("GemmSmoothed zero factor", Status.InvalidArgument, "smoothing factor [2] is 0" + rule,
                    () => p.GemmSmoothed(new float[8], with(2, 0f), new float[12]));
                ExpectDynq("GemmSmoothed NaN factor", Status.InvalidArgument, "smoothing factor [1] is NaN" + rule,
                    () => p.GemmSmoothed(new float[8], with(1, float.NaN), new float[12]));
                ExpectDynq("GemmSmoothed negative factor", Status.InvalidArgument, "smoothing factor [3] is -0.5" + rule,
                    () => p.GemmSmoothed(new float[8], with(3, -0.5f), new float[12]));
                ExpectDynq("GemmSmoothed infinite factor", Status.InvalidArgument, "smoothing factor [0] is inf" + rule,
                    () => p.GemmSmoothed(new float[8], with(0, float.PositiveInfinity), new float[12]));
                ExpectDynq("GemmSmoothed zero factor, f16", Status.InvalidArgument, "smoothing factor [2] is 0" + rule,
                    () => p.GemmSmoothed(new ushort[8], F16, with(2, 0f), new ushort[12], F16));
                ExpectDynq("GemmSmoothed NaN factor, bf16 in, float out", Status.InvalidArgument,
                    "smoothing factor [0] is NaN" + rule, () => p.GemmSmoothed(new ushort[8], BF16, with(0, float.NaN), new float[12]));
                ExpectDynq("GemmSmoothed NaN factor, float in, f16 out", Status.InvalidArgument,
                    "smoothing factor [1] is NaN" + rule, () => p.GemmSmoothed(new float[8], with(1, float.NaN), new ushort[12], F16));
                ExpectDynq("GemmSmoothed zero factor, zero rows", Status.InvalidArgument, "smoothing factor [2] is 0" + rule,
                    () => p.GemmSmoothed(new float[0], with(2, 0f), new float[0]));
                float[] huge = new float[8];
                huge[5] = 3e38f;
                ExpectDynq("GemmSmoothed product overflows", Status.NonFinite, "A[1][1]",
                    () => p.GemmSmoothed(huge, good, new float[12]));
                float[] shared = new float[16];
                ExpectDynq("GemmSmoothed y overlaps smooth", Status.InvalidArgument, "y overlaps smooth",
                    () => p.GemmSmoothed(new ReadOnlySpan<float>(new float[8]), new ReadOnlySpan<float>(shared, 8, 4),
                        new Span<float>(shared, 0, 12), ReadOnlySpan<float>.Empty));
                ExpectDynq("GemmSmoothed unknown a type", Status.InvalidArgument, "a_type=7 is not a dynq_dtype value",
                    () => p.GemmSmoothed(new ushort[8], (ElementType)7, good, new ushort[12], F16));
                DynqException de = null;
                try
                {
                    p.GemmSmoothed(new float[8], with(2, 0f), new float[12]);
                }
                catch (DynqException e)
                {
                    de = e;
                }
                Check(de != null && de.Function == "dynq_gemm_smoothed"
                        && de.LibraryMessage == "smoothing factor [2] is 0" + rule,
                    "GemmSmoothed zero factor: " + (de == null ? "no exception" : de.Function + ": " + de.LibraryMessage));

                // Lengths checked by the binding.
                ArgumentException ae = Expect<ArgumentException>("GemmSmoothed 3 factors for K = 4",
                    () => p.GemmSmoothed(new float[8], new float[] { 1, 1, 1 }, new float[12]));
                Check(ae != null && ae.ParamName == "smooth"
                        && ae.Message.Contains("smooth has 3 values, expected 0 or K = 4"),
                    "GemmSmoothed 3 factors: " + (ae == null ? "no exception" : ae.ParamName + ": " + ae.Message));
                ae = Expect<ArgumentException>("GemmSmoothed 5 factors for K = 4, f16",
                    () => p.GemmSmoothed(new ushort[8], F16, new float[] { 1, 1, 1, 1, 1 }, new ushort[12], F16));
                Check(ae != null && ae.ParamName == "smooth" && ae.Message.Contains("smooth has 5 values"),
                    "GemmSmoothed 5 factors names smooth");
                // Before the values: zeros of the wrong length are a length error, not the library's.
                ae = Expect<ArgumentException>("GemmSmoothed 3 zero factors",
                    () => p.GemmSmoothed(new ReadOnlySpan<float>(new float[8]), new ReadOnlySpan<float>(new float[3]),
                        new Span<ushort>(new ushort[12]), BF16, ReadOnlySpan<float>.Empty));
                Check(ae != null && ae.ParamName == "smooth", "GemmSmoothed 3 zero factors names smooth");
                ae = Expect<ArgumentException>("GemmSmoothed 1 factor, zero rows",
                    () => p.GemmSmoothed(new float[0], new float[] { 2 }, new float[0]));
                Check(ae != null && ae.ParamName == "smooth", "GemmSmoothed 1 factor, zero rows names smooth");
                ae = Expect<ArgumentException>("GemmSmoothed a not a multiple of K",
                    () => p.GemmSmoothed(new float[7], good, new float[12]));
                Check(ae != null && ae.ParamName == "a", "GemmSmoothed a not a multiple of K names a");
                ae = Expect<ArgumentException>("GemmSmoothed 16-bit activations typed F32",
                    () => p.GemmSmoothed(new ushort[8], ElementType.F32, good, new float[12]));
                Check(ae != null && ae.ParamName == "aType", "GemmSmoothed F32 for 16-bit activations names aType");
                Expect<ArgumentNullException>("GemmSmoothed null activations", () => p.GemmSmoothed((float[])null, good, new float[6]));
                Expect<ArgumentNullException>("GemmSmoothed null outputs",
                    () => p.GemmSmoothed(new ushort[4], F16, good, (ushort[])null, F16));

                // y is left untouched by a failing call.
                foreach (float[] smooth in new[] { with(2, 0f), with(1, float.NaN), new float[] { 1, 1, 1 } })
                {
                    ushort[] y = new ushort[12];
                    for (int i = 0; i < y.Length; i++) y[i] = 0x4700;
                    try
                    {
                        p.GemmSmoothed(new ushort[8], F16, smooth, y, F16);
                        Check(false, "GemmSmoothed accepted factors [" + string.Join(", ", smooth) + "]");
                    }
                    catch (Exception e) when (e is DynqException || e is ArgumentException)
                    {
                    }
                    Check(Array.TrueForAll(y, v => v == 0x4700),
                        "a failing GemmSmoothed (factors [" + string.Join(", ", smooth) + "]) leaves y untouched");
                }
            }

            PackedWeights disposed = PackedWeights.Pack(new float[] { 1, 2, 3, 4 }, 2, 2);
            disposed.Dispose();
            Expect<ObjectDisposedException>("GemmSmoothed after Dispose",
                () => disposed.GemmSmoothed(new float[] { 1, 1 }, new float[] { 1, 2 }, new float[2]));
        }
    }
}
