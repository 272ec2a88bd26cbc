// Tests of GemmResidual (dynq_gemm_residual): bit for bit GemmSmoothed with float outputs
// followed by one float addition of the widened residual, rounded to y's type, for every pair
// of element types, on arrays and spans; without a residual (null, empty) GemmSmoothed; a
// residual that is y itself refused by the library with y untouched; lengths and types refused
// by the binding with ArgumentException.
using System;
using System.Reflection;

namespace Dynq.Tests
{
    internal static partial class Program
    {
        // y32 plus the residual, one float addition per element: what GemmResidual computes
        // before the rounding to y's type. The sum of two floats computed in double and rounded
        // to float is the float sum (double has more than 2 * 24 + 2 bits), so the cast rounds as
        // one float addition does.
        private static float[] PlusResidual(float[] y32, float[] residual)
        {
            float[] v = new float[y32.Length];
            for (int i = 0; i < v.Length; i++) v[i] = (float)((double)y32[i] + residual[i]);
            return v;
        }

        // One GemmResidual call on a (float a32 or 16-bit a16 of type at) into y32 or y16 (of type
        // yt) with the residual r32 or r16, through the array overloads (variant 0), the span
        // overloads with bias (1) or, for a null bias, without it (2).
        private static void CallResidual(PackedWeights p, ElementType at, float[] a32, ushort[] a16, float[] smooth,
            ElementType yt, float[] r32, ushort[] r16, float[] y32, ushort[] y16, float[] bias, GemmOptions options,
            int variant)
        {
            ReadOnlySpan<float> s = smooth == null ? ReadOnlySpan<float>.Empty : new ReadOnlySpan<float>(smooth);
            ReadOnlySpan<float> b = bias == null ? ReadOnlySpan<float>.Empty : new ReadOnlySpan<float>(bias);
            bool noBias = variant == 2 && bias == null;
            if (at == ElementType.F32 && yt == ElementType.F32)
            {
                if (variant == 0) p.GemmResidual(a32, smooth, r32, y32, bias, options);
                else if (noBias) p.GemmResidual(new ReadOnlySpan<float>(a32), s, new ReadOnlySpan<float>(r32), new Span<float>(y32), options);
                else p.GemmResidual(new ReadOnlySpan<float>(a32), s, new ReadOnlySpan<float>(r32), new Span<float>(y32), b, options);
            }
            else if (at == ElementType.F32)
            {
                if (variant == 0) p.GemmResidual(a32, smooth, r16, y16, yt, bias, options);
                else if (noBias) p.GemmResidual(new ReadOnlySpan<float>(a32), s, new ReadOnlySpan<ushort>(r16), new Span<ushort>(y16), yt, options);
                else p.GemmResidual(new ReadOnlySpan<float>(a32), s, new ReadOnlySpan<ushort>(r16), new Span<ushort>(y16), yt, b, options);
            }
            else if (yt == ElementType.F32)
            {
                if (variant == 0) p.GemmResidual(a16, at, smooth, r32, y32, bias, options);
                else if (noBias) p.GemmResidual(new ReadOnlySpan<ushort>(a16), at, s, new ReadOnlySpan<float>(r32), new Span<float>(y32), options);
                else p.GemmResidual(new ReadOnlySpan<ushort>(a16), at, s, new ReadOnlySpan<float>(r32), new Span<float>(y32), b, options);
            }
            else
            {
                if (variant == 0) p.GemmResidual(a16, at, smooth, r16, y16, yt, bias, options);
                else if (noBias) p.GemmResidual(new ReadOnlySpan<ushort>(a16), at, s, new ReadOnlySpan<ushort>(r16), new Span<ushort>(y16), yt, options);
                else p.GemmResidual(new ReadOnlySpan<ushort>(a16), at, s, new ReadOnlySpan<ushort>(r16), new Span<ushort>(y16), yt, b, options);
            }
        }

        // GemmSmoothed of a (float a32 or 16-bit a16 of type at) with float outputs.
        private static float[] SmoothedFloat(PackedWeights p, ElementType at, float[] a32, ushort[] a16, float[] smooth,
            float[] bias, GemmOptions options, int m)
        {
            float[] y = new float[m * p.N];
            if (at == ElementType.F32) p.GemmSmoothed(a32, smooth, y, bias, options);
            else p.GemmSmoothed(a16, at, smooth, y, bias, options);
            return y;
        }

        // GemmResidual on every pair of element types equals GemmSmoothed with float outputs plus
        // the widened residual in float, rounded to the output type, bit for bit.
        private static void TestGemmResidualMatchesGemmSmoothed()
        {
            GemmExCase[] cases =
            {
                new GemmExCase("residual 1x1x1", 1, 1, 1, scaleW: 1f),
                new GemmExCase("residual defaults", 3, 17, 33),
                new GemmExCase("residual, no factors", 4, 20, 36, skew: -1f),
                new GemmExCase("residual, no bias, per-tensor symmetric", 5, 24, 48, bias: false, scaleA: 2f,
                    options: new GemmOptions { ActGranularity = ActGranularity.PerTensor, ActType = ActType.SymmetricI8 }),
                new GemmExCase("residual, relu, two threads", 9, 40, 130, scaleA: 0.5f,
                    options: new GemmOptions { Epilogue = Epilogue.Relu, NumThreads = 2 }),
                new GemmExCase("residual, gelu", 6, 24, 40, scaleW: 1f, options: new GemmOptions { Epilogue = Epilogue.Gelu }),
                new GemmExCase("residual, large values", 4, 16, 32, skew: 30000f),
                new GemmExCase("residual, zero rows", 0, 8, 16),
            };
            ElementType[] types = { ElementType.F32, ElementType.F16, ElementType.BF16 };
            int seed = 400, call = 0;
            foreach (GemmExCase c in cases)
            {
                Run(c.Name, () =>
                {
                    Random r = new Random(seed++);
                    using (PackedWeights p = PackedWeights.Pack(RandomArray(r, c.N * c.K, c.ScaleW, 0f), c.N, c.K))
                    {
                        float[] a32 = OutlierActivations(r, c.M, c.K, c.ScaleA);
                        // The case named "no factors" runs with smooth null (GemmResidual = GemmEx + residual).
                        float[] smooth = c.Name.EndsWith("no factors") ? null : SmoothingFactors(r, c.K);
                        float[] bias = c.Bias ? RandomArray(r, c.N, 1f, 0f) : null;
                        // Residuals about as large as the outputs (the skew of the case moves them).
                        float[] res32 = RandomArray(r, c.M * c.N, 4f, c.Skew);
                        foreach (ElementType at in types)
                        {
                            foreach (ElementType yt in types)
                            {
                                string what = c.Name + ", " + at + " -> " + yt;
                                ushort[] a16 = at == ElementType.F32 ? null : Narrow(a32, at);
                                float[] smoothed32 = SmoothedFloat(p, at, a32, a16, smooth, bias, c.Options, c.M);
                                int variant = call++ % 3; // arrays, spans with bias, spans without bias in turn
                                if (yt == ElementType.F32)
                                {
                                    float[] y = new float[c.M * c.N];
                                    CallResidual(p, at, a32, a16, smooth, yt, res32, null, y, null, bias, c.Options, variant);
                                    string diff = FirstDifference(y, PlusResidual(smoothed32, res32));
                                    Check(diff == null, what + ": GemmResidual equals GemmSmoothed plus the residual: " + diff);
                                    if (c.M > 0)
                                    {
                                        Check(FirstDifference(y, smoothed32) != null, what + ": the residual is added");
                                    }
                                    if (c.Options != null && c.Options.Epilogue == Epilogue.Relu)
                                    {
                                        Check(Array.Exists(y, v => v < 0), what + ": negative outputs (the residual comes after the ReLU)");
                                    }
                                }
                                else
                                {
                                    ushort[] res16 = Narrow(res32, yt);
                                    ushort[] y = new ushort[c.M * c.N];
                                    CallResidual(p, at, a32, a16, smooth, yt, null, res16, null, y, bias, c.Options, variant);
                                    ushort[] want = Narrow(PlusResidual(smoothed32, Widen(res16, yt)), yt);
                                    string diff = FirstDifference(y, want);
                                    Check(diff == null, what + ": GemmResidual equals GemmSmoothed plus the residual, rounded: " + diff);
                                    if (c.M > 0)
                                    {
                                        Check(FirstDifference(y, Narrow(smoothed32, yt)) != null, what + ": the residual is added");
                                    }
                                }
                            }
                        }
                    }
                });
            }
        }

        // Without a residual (null array, empty span), GemmResidual is GemmSmoothed; with a
        // residual of negative zeros, whose addition changes no value, too.
        private static void TestGemmResidualWithoutResidual()
        {
            Random r = new Random(41);
            int n = 12, k = 40, m = 4;
            using (PackedWeights p = PackedWeights.Pack(RandomArray(r, n * k, 0.5f, 0f), n, k))
            {
                float[] a32 = OutlierActivations(r, m, k, 1f);
                float[] smooth = SmoothingFactors(r, k);
                float[] bias = RandomArray(r, n, 1f, 0f);
                GemmOptions options = new GemmOptions { ActType = ActType.SymmetricI8, Epilogue = Epilogue.Relu };
                float[] negZeros = new float[m * n];
                for (int i = 0; i < negZeros.Length; i++) negZeros[i] = -0f;
                Check(BitConverter.SingleToInt32Bits(negZeros[0]) == unchecked((int)0x80000000), "-0f is negative zero");
                ElementType[] types = { ElementType.F32, ElementType.F16, ElementType.BF16 };
                foreach (ElementType at in types)
                {
                    ushort[] a16 = at == ElementType.F32 ? null : Narrow(a32, at);
                    float[] smoothed32 = SmoothedFloat(p, at, a32, a16, smooth, bias, options, m);
                    foreach (ElementType yt in types)
                    {
                        string what = at + " -> " + yt;
                        for (int variant = 0; variant < 3; variant++)
                        {
                            // variant 0: null arrays; 1, 2: empty spans (with bias); 2: negative zeros.
                            float[] r32 = variant == 2 ? negZeros : variant == 1 ? new float[0] : null;
                            ushort[] r16 = yt == ElementType.F32 ? null
                                : variant == 2 ? Narrow(negZeros, yt) : variant == 1 ? new ushort[0] : null;
                            string name = variant == 2 ? "negative zeros" : variant == 1 ? "empty" : "null";
                            if (yt == ElementType.F32)
                            {
                                float[] y = new float[m * n];
                                CallResidual(p, at, a32, a16, smooth, yt, r32, null, y, null, bias, options, variant == 0 ? 0 : 1);
                                Check(FirstDifference(y, smoothed32) == null,
                                    what + ": GemmResidual with a " + name + " residual equals GemmSmoothed");
                            }
                            else
                            {
                                ushort[] y = new ushort[m * n];
                                CallResidual(p, at, a32, a16, smooth, yt, null, r16, null, y, bias, options, variant == 0 ? 0 : 1);
                                Check(FirstDifference(y, Narrow(smoothed32, yt)) == null,
                                    what + ": GemmResidual with a " + name + " residual equals GemmSmoothed");
                            }
                        }
                    }
                }

                // Without factors nor residual, GemmResidual is Gemm.
                ushort[] a16f = Narrow(a32, ElementType.F16);
                ushort[] want16 = new ushort[m * n];
                p.Gemm(a16f, ElementType.F16, want16, ElementType.BF16, bias);
                ushort[] got16 = new ushort[m * n];
                p.GemmResidual(a16f, ElementType.F16, null, null, got16, ElementType.BF16, bias);
                Check(FirstDifference(got16, want16) == null, "GemmResidual without factors nor residual equals Gemm");

                // A residual inside a larger buffer, as a span: only its m * N values are read.
                ushort[] res = Narrow(RandomArray(r, m * n, 2f, 0f), ElementType.F16);
                ushort[] big = new ushort[m * n + 7];
                for (int i = 0; i < big.Length; i++) big[i] = 0x7e00; // NaN
                Array.Copy(res, 0, big, 3, res.Length);
                ushort[] wantS = new ushort[m * n];
                p.GemmResidual(a32, smooth, res, wantS, ElementType.F16, bias);
                ushort[] gotS = new ushort[m * n];
                p.GemmResidual(new ReadOnlySpan<float>(a32), new ReadOnlySpan<float>(smooth), new ReadOnlySpan<ushort>(big, 3, m * n),
                    new Span<ushort>(gotS), ElementType.F16, new ReadOnlySpan<float>(bias));
                Check(FirstDifference(gotS, wantS) == null, "GemmResidual with the residual in a span of a larger buffer");

                // NaN and infinity in the residual give NaN and infinity in their element only.
                float[] special = new float[m * n];
                special[4] = float.NaN;
                special[7] = float.PositiveInfinity;
                special[m * n - 1] = float.NegativeInfinity;
                float[] ySpecial = new float[m * n];
                p.GemmResidual(a32, smooth, special, ySpecial, bias, options);
                float[] yPlain = p.Forward(Smoothed(a32, smooth), bias, options);
                bool ok = float.IsNaN(ySpecial[4]) && float.IsPositiveInfinity(ySpecial[7])
                    && float.IsNegativeInfinity(ySpecial[m * n - 1]);
                for (int i = 0; i < m * n; i++)
                {
                    if (i != 4 && i != 7 && i != m * n - 1) ok = ok && BitsOf(ySpecial[i]) == BitsOf(yPlain[i] + special[i]);
                }
                Check(ok, "NaN and infinity in the residual give NaN and infinity in their element only");
            }
        }

        private static void TestGemmResidualErrors()
        {
            Random r = new Random(6);
            using (PackedWeights p = PackedWeights.Pack(RandomArray(r, 6 * 4, 1f, 0f), 6, 4)) // N = 6, K = 4
            {
                const ElementType F16 = ElementType.F16, BF16 = ElementType.BF16;
                float[] good = { 0.5f, 2f, 1.5f, 3f };

                // Lengths checked by the binding.
                ArgumentException ae = Expect<ArgumentException>("GemmResidual 11 residual values for m * N = 12",
                    () => p.GemmResidual(new float[8], good, new float[11], new float[12]));
                Check(ae != null && ae.ParamName == "residual"
                        && ae.Message.Contains("residual has 11 values, expected 0 (none) or y's length m * N = 2 * 6 = 12"),
                    "GemmResidual 11 residual values: " + (ae == null ? "no exception" : ae.ParamName + ": " + ae.Message));
                ae = Expect<ArgumentException>("GemmResidual 13 residual values, f16",
                    () => p.GemmResidual(new ushort[8], F16, null, new ushort[13], new ushort[12], F16));
                Check(ae != null && ae.ParamName == "residual" && ae.Message.Contains("residual has 13 values"),
                    "GemmResidual 13 residual values names residual");
                ae = Expect<ArgumentException>("GemmResidual residual for zero rows",
                    () => p.GemmResidual(new ReadOnlySpan<float>(new float[0]), ReadOnlySpan<float>.Empty,
                        new ReadOnlySpan<ushort>(new ushort[6]), new Span<ushort>(new ushort[0]), BF16));
                Check(ae != null && ae.ParamName == "residual" && ae.Message.Contains("m * N = 0 * 6 = 0"),
                    "GemmResidual residual for zero rows names residual");
                ae = Expect<ArgumentException>("GemmResidual 3 factors",
                    () => p.GemmResidual(new float[8], new float[] { 1, 1, 1 }, new float[12], new float[12]));
                Check(ae != null && ae.ParamName == "smooth", "GemmResidual 3 factors names smooth");
                ae = Expect<ArgumentException>("GemmResidual y of the wrong length",
                    () => p.GemmResidual(new float[8], good, new float[12], new float[11]));
                Check(ae != null && ae.ParamName == "y", "GemmResidual y of the wrong length names y");
                Expect<ArgumentNullException>("GemmResidual null outputs",
                    () => p.GemmResidual(new float[8], good, new float[12], (float[])null));

                // Types: the residual has y's element type by signature (float with float y, ushort
                // with ushort y, typed by yType); 16-bit data typed F32 is refused.
                ae = Expect<ArgumentException>("GemmResidual 16-bit residual and y typed F32",
                    () => p.GemmResidual(new ushort[8], F16, good, new ushort[12], new ushort[12], ElementType.F32));
                Check(ae != null && ae.ParamName == "yType", "GemmResidual 16-bit residual and y typed F32 names yType");
                ae = Expect<ArgumentException>("GemmResidual 16-bit residual and y typed F32, float activations",
                    () => p.GemmResidual(new float[8], good, new ushort[12], new ushort[12], ElementType.F32));
                Check(ae != null && ae.ParamName == "yType", "GemmResidual F32 for 16-bit outputs names yType");
                int overloads = 0;
                foreach (MethodInfo mi in typeof(PackedWeights).GetMethods(BindingFlags.Public | BindingFlags.Instance))
                {
                    if (mi.Name != "GemmResidual") continue;
                    overloads++;
                    ParameterInfo residual = Array.Find(mi.GetParameters(), pi => pi.Name == "residual");
                    ParameterInfo y = Array.Find(mi.GetParameters(), pi => pi.Name == "y");
                    Func<Type, Type> element = t => t.IsArray ? t.GetElementType() : t.GetGenericArguments()[0];
                    Check(residual != null && y != null && element(residual.ParameterType) == element(y.ParameterType),
                        "GemmResidual(" + string.Join(", ", Array.ConvertAll(mi.GetParameters(), pi => pi.ParameterType.Name))
                        + "): the residual has y's element type");
                }
                Check(overloads == 12, "GemmResidual has 12 overloads (4 type pairs x arrays, spans, spans without bias): " + overloads);

                // Refused by the library, with its message.
                ExpectDynq("GemmResidual zero factor", Status.InvalidArgument, "smoothing factor [1] is 0",
                    () => p.GemmResidual(new float[8], new float[] { 0.5f, 0f, 1.5f, 3f }, new float[12], new float[12]));
                float[] nanA = new float[8];
                nanA[5] = float.NaN;
                ExpectDynq("GemmResidual NaN activation", Status.NonFinite, "A[1][1]",
                    () => p.GemmResidual(nanA, null, new ushort[12], new ushort[12], F16));
                ExpectDynq("GemmResidual unknown a type", Status.InvalidArgument, "a_type=7 is not a dynq_dtype value",
                    () => p.GemmResidual(new ushort[8], (ElementType)7, good, new ushort[12], new ushort[12], F16));
                float[] shared = new float[24];
                ExpectDynq("GemmResidual residual overlaps y", Status.InvalidArgument, "y overlaps residual",
                    () => p.GemmResidual(new ReadOnlySpan<float>(new float[8]), new ReadOnlySpan<float>(good),
                        new ReadOnlySpan<float>(shared, 6, 12), new Span<float>(shared, 0, 12), ReadOnlySpan<float>.Empty));

                // A residual that is y itself: refused by the library, y untouched, every type.
                const string overlap =
                    "y overlaps residual; the output must be a separate buffer (to accumulate into y, copy it first)";
                float[] y32 = new float[12];
                for (int i = 0; i < y32.Length; i++) y32[i] = i + 0.25f;
                float[] before32 = (float[])y32.Clone();
                ExpectDynq("GemmResidual residual is y (float)", Status.InvalidArgument, overlap,
                    () => p.GemmResidual(new float[8], good, y32, y32));
                Check(FirstDifference(y32, before32) == null, "a refused GemmResidual (residual is y, float) leaves y untouched");
                foreach (ElementType yt in new[] { F16, BF16 })
                {
                    ushort[] y16 = Narrow(before32, yt);
                    ushort[] before16 = (ushort[])y16.Clone();
                    DynqException de = Expect<DynqException>("GemmResidual residual is y (" + yt + ")",
                        () => p.GemmResidual(new ushort[8], F16, good, y16, y16, yt));
                    Check(de != null && de.Status == Status.InvalidArgument && de.Function == "dynq_gemm_residual"
                            && de.LibraryMessage == overlap,
                        "GemmResidual residual is y (" + yt + "): "
                        + (de == null ? "no exception" : de.Status + ", " + de.Function + ": " + de.LibraryMessage));
                    Check(FirstDifference(y16, before16) == null,
                        "a refused GemmResidual (residual is y, " + yt + ") leaves y untouched");
                }

                // y is left untouched by the other failing calls too.
                Action<ushort[]>[] failing =
                {
                    y => p.GemmResidual(new ushort[8], F16, null, new ushort[11], y, F16),
                    y => p.GemmResidual(nanA, null, new ushort[12], y, F16),
                    y => p.GemmResidual(new ushort[8], F16, new float[] { 1, 1, -1, 1 }, new ushort[12], y, F16),
                };
                for (int f = 0; f < failing.Length; f++)
                {
                    ushort[] y = new ushort[12];
                    for (int i = 0; i < y.Length; i++) y[i] = 0x4700;
                    try
                    {
                        failing[f](y);
                        Check(false, "failing GemmResidual call " + f + " accepted");
                    }
                    catch (Exception e) when (e is DynqException || e is ArgumentException)
                    {
                    }
                    Check(Array.TrueForAll(y, v => v == 0x4700), "a failing GemmResidual (call " + f + ") leaves y untouched");
                }
            }

            PackedWeights disposed = PackedWeights.Pack(new float[] { 1, 2, 3, 4 }, 2, 2);
            disposed.Dispose();
            Expect<ObjectDisposedException>("GemmResidual after Dispose",
                () => disposed.GemmResidual(new float[] { 1, 1 }, null, new float[2], new float[2]));
        }
    }
}
