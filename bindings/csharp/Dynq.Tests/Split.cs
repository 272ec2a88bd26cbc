// Tests of GemmSplit (dynq_gemm_split): each output bit for bit its columns of GemmSmoothed,
// for every pair of element types, on arrays and on Memory parts of one buffer (nothing written
// around them); one output of width N is Gemm; lengths refused by the binding with
// ArgumentException, one element type for all outputs by signature; bad widths and outputs
// sharing memory refused by the library with the outputs untouched.
using System;
using System.Reflection;

namespace Dynq.Tests
{
    internal static partial class Program
    {
        private struct SplitCase
        {
            public string Name;
            public int M, K;
            public int[] Widths;
            public GemmOptions Options;
            public bool Bias, Smooth;

            public SplitCase(string name, int m, int k, int[] widths, GemmOptions options = null, bool bias = true,
                bool smooth = true)
            {
                Name = name;
                M = m;
                K = k;
                Widths = widths;
                Options = options;
                Bias = bias;
                Smooth = smooth;
            }
        }

        // Columns [from, from + w) of the m x n matrix s, as a dense m x w matrix.
        private static T[] Columns<T>(T[] s, int m, int n, int from, int w)
        {
            T[] c = new T[m * w];
            for (int i = 0; i < m; i++) Array.Copy(s, i * n + from, c, i * w, w);
            return c;
        }

        // One GemmSplit call into outputs of m rows of the widths: new arrays (variant 0, through
        // arrays), or Memory parts of one buffer filled with sentinel, with 3 elements between and
        // around them (other variants, through memory). Returns the outputs; gaps says which
        // element around them was written, or is null.
        private static T[][] SplitCall<T>(int m, int[] widths, T sentinel, int variant, Action<T[][]> arrays,
            Action<Memory<T>[]> memory, out string gaps)
        {
            T[][] ys = new T[widths.Length][];
            gaps = null;
            if (variant == 0)
            {
                for (int g = 0; g < widths.Length; g++) ys[g] = new T[m * widths[g]];
                arrays(ys);
                return ys;
            }
            const int gap = 3;
            int total = gap;
            foreach (int w in widths) total += m * w + gap;
            T[] buffer = new T[total];
            for (int i = 0; i < total; i++) buffer[i] = sentinel;
            Memory<T>[] parts = new Memory<T>[widths.Length];
            bool[] inside = new bool[total];
            for (int g = 0, at = gap; g < widths.Length; at += m * widths[g] + gap, g++)
            {
                parts[g] = new Memory<T>(buffer, at, m * widths[g]);
                for (int i = at; i < at + m * widths[g]; i++) inside[i] = true;
            }
            memory(parts);
            for (int i = 0; i < total && gaps == null; i++)
            {
                if (!inside[i] && !buffer[i].Equals(sentinel)) gaps = "element " + i + " of the buffer, outside the outputs";
            }
            for (int g = 0; g < widths.Length; g++) ys[g] = parts[g].ToArray();
            return ys;
        }

        // GemmSplit on every pair of element types gives, in each output, exactly its columns of
        // GemmSmoothed, bit for bit.
        private static void TestGemmSplitMatchesGemmSmoothed()
        {
            SplitCase[] cases =
            {
                new SplitCase("split 5+39+17", 7, 70, new[] { 5, 39, 17 }),
                new SplitCase("split 1x1x1", 1, 1, new[] { 1 }),
                new SplitCase("split, no factors, no bias, 13+35", 4, 36, new[] { 13, 35 }, bias: false, smooth: false),
                new SplitCase("split, relu, two threads, 17+5+39+3", 9, 130, new[] { 17, 5, 39, 3 },
                    options: new GemmOptions { Epilogue = Epilogue.Relu, NumThreads = 2 }),
                new SplitCase("split, gelu, per-tensor symmetric, 1+22+1", 5, 40, new[] { 1, 22, 1 },
                    options: new GemmOptions
                    {
                        Epilogue = Epilogue.Gelu, ActGranularity = ActGranularity.PerTensor, ActType = ActType.SymmetricI8,
                    }),
                new SplitCase("split, one output of 61", 3, 33, new[] { 61 }),
                new SplitCase("split, zero rows, 5+3", 0, 16, new[] { 5, 3 }),
            };
            ElementType[] types = { ElementType.F32, ElementType.F16, ElementType.BF16 };
            int seed = 500, call = 0;
            foreach (SplitCase c in cases)
            {
                Run(c.Name, () =>
                {
                    int n = 0;
                    foreach (int w in c.Widths) n += w;
                    Random r = new Random(seed++);
                    using (PackedWeights p = PackedWeights.Pack(RandomArray(r, n * c.K, 0.5f, 0f), n, c.K))
                    {
                        float[] a32 = OutlierActivations(r, c.M, c.K, 1f);
                        float[] smooth = c.Smooth ? SmoothingFactors(r, c.K) : null;
                        float[] bias = c.Bias ? RandomArray(r, n, 1f, 0f) : null;
                        GemmOptions o = c.Options;
                        foreach (ElementType at in types)
                        {
                            foreach (ElementType yt in types)
                            {
                                string what = c.Name + ", " + at + " -> " + yt;
                                ushort[] a16 = at == ElementType.F32 ? null : Narrow(a32, at);
                                int variant = call++ % 3; // arrays, memory with bias, memory without bias in turn
                                bool noBias = variant == 2 && bias == null;
                                string gaps, diff = null;
                                if (yt == ElementType.F32)
                                {
                                    float[] want = new float[c.M * n];
                                    if (at == ElementType.F32) p.GemmSmoothed(a32, smooth, want, bias, o);
                                    else p.GemmSmoothed(a16, at, smooth, want, bias, o);
                                    float[][] ys = SplitCall(c.M, c.Widths, 7.5f, variant, arrays =>
                                    {
                                        if (at == ElementType.F32) p.GemmSplit(a32, smooth, c.Widths, arrays, bias, o);
                                        else p.GemmSplit(a16, at, smooth, c.Widths, arrays, bias, o);
                                    }, parts =>
                                    {
                                        if (at == ElementType.F32 && noBias) p.GemmSplit(new ReadOnlySpan<float>(a32), SpanOf(smooth), c.Widths, parts, o);
                                        else if (at == ElementType.F32) p.GemmSplit(new ReadOnlySpan<float>(a32), SpanOf(smooth), c.Widths, parts, SpanOf(bias), o);
                                        else if (noBias) p.GemmSplit(new ReadOnlySpan<ushort>(a16), at, SpanOf(smooth), c.Widths, parts, o);
                                        else p.GemmSplit(new ReadOnlySpan<ushort>(a16), at, SpanOf(smooth), c.Widths, parts, SpanOf(bias), o);
                                    }, out gaps);
                                    for (int g = 0, from = 0; g < ys.Length && diff == null; from += c.Widths[g], g++)
                                    {
                                        string d = FirstDifference(ys[g], Columns(want, c.M, n, from, c.Widths[g]));
                                        if (d != null) diff = "output " + g + ": " + d;
                                    }
                                }
                                else
                                {
                                    ushort[] want = new ushort[c.M * n];
                                    if (at == ElementType.F32) p.GemmSmoothed(a32, smooth, want, yt, bias, o);
                                    else p.GemmSmoothed(a16, at, smooth, want, yt, bias, o);
                                    ushort[][] ys = SplitCall(c.M, c.Widths, (ushort)0x4700, variant, arrays =>
                                    {
                                        if (at == ElementType.F32) p.GemmSplit(a32, smooth, c.Widths, arrays, yt, bias, o);
                                        else p.GemmSplit(a16, at, smooth, c.Widths, arrays, yt, bias, o);
                                    }, parts =>
                                    {
                                        if (at == ElementType.F32 && noBias) p.GemmSplit(new ReadOnlySpan<float>(a32), SpanOf(smooth), c.Widths, parts, yt, o);
                                        else if (at == ElementType.F32) p.GemmSplit(new ReadOnlySpan<float>(a32), SpanOf(smooth), c.Widths, parts, yt, SpanOf(bias), o);
                                        else if (noBias) p.GemmSplit(new ReadOnlySpan<ushort>(a16), at, SpanOf(smooth), c.Widths, parts, yt, o);
                                        else p.GemmSplit(new ReadOnlySpan<ushort>(a16), at, SpanOf(smooth), c.Widths, parts, yt, SpanOf(bias), o);
                                    }, out gaps);
                                    for (int g = 0, from = 0; g < ys.Length && diff == null; from += c.Widths[g], g++)
                                    {
                                        string d = FirstDifference(ys[g], Columns(want, c.M, n, from, c.Widths[g]));
                                        if (d != null) diff = "output " + g + ": " + d;
                                    }
                                }
                                Check(diff == null, what + ": GemmSplit's outputs are the columns of GemmSmoothed: " + diff);
                                Check(gaps == null, what + ": GemmSplit writes nothing around its outputs: " + gaps);
                            }
                        }
                    }
                });
            }
        }

        // One output of width N is GemmSmoothed, hence Gemm without factors; outputs of width 1
        // are the columns one by one.
        private static void TestGemmSplitOneOutputAndNarrowOutputs()
        {
            Random r = new Random(51);
            int n = 7, k = 24, m = 3;
            using (PackedWeights p = PackedWeights.Pack(RandomArray(r, n * k, 0.5f, 0f), n, k))
            {
                float[] a = RandomArray(r, m * k, 1f, 0f);
                float[] bias = RandomArray(r, n, 1f, 0f);
                GemmOptions options = new GemmOptions { ActType = ActType.SymmetricI8 };
                float[] want = p.Forward(a, bias, options);
                float[][] one = { new float[m * n] };
                p.GemmSplit(a, null, new[] { n }, one, bias, options);
                Check(FirstDifference(one[0], want) == null, "GemmSplit with one output of width N equals Gemm");

                ushort[][] narrow = new ushort[n][];
                int[] ones = new int[n];
                for (int j = 0; j < n; j++)
                {
                    narrow[j] = new ushort[m];
                    ones[j] = 1;
                }
                p.GemmSplit(a, null, ones, narrow, ElementType.BF16, bias, options);
                ushort[] want16 = Narrow(want, ElementType.BF16);
                bool same = true;
                for (int j = 0; j < n; j++) same = same && FirstDifference(narrow[j], Columns(want16, m, n, j, 1)) == null;
                Check(same, "GemmSplit with " + n + " outputs of width 1 gives the columns of Gemm one by one");
            }
        }

        // GemmSplitHeads: every value of GemmSmoothed at its place in [batch, heads, seq, d] (heads of
        // 16), [batch, heads, d, seq] (heads of 12) and a dense output; bad layouts refused with the
        // outputs untouched.
        // Where element (i, j) of an output of width w lands in the head layout `layout` (rows
        // i = b * seq + s): the dense place i * w + j when the layout is dense.
        private static int HeadPlace(HeadLayout layout, int w, int seq, int i, int j)
        {
            if (layout.Heads == 0) return i * w + j;
            int h = layout.Heads, d = w / h, b = i / seq, s = i % seq, hh = j / d, e = j % d;
            return layout.Transposed ? ((b * h + hh) * d + e) * seq + s : ((b * h + hh) * seq + s) * d + e;
        }

        private static void TestGemmSplitHeads()
        {
            Random r = new Random(13);
            const int batch = 2, seq = 5, m = batch * seq, k = 24;
            int[] widths = { 64, 36, 20 };
            int n = 120;
            using (PackedWeights p = PackedWeights.Pack(RandomArray(r, n * k, 0.5f, 0f), n, k))
            {
                float[] a = RandomArray(r, m * k, 1f, 0f);
                float[] bias = RandomArray(r, n, 1f, 0f);
                float[] whole = new float[m * n];
                p.GemmSmoothed(a, null, whole, bias);
                HeadLayout[] heads = { new HeadLayout(4, seq), new HeadLayout(3, seq, true), new HeadLayout() };
                Memory<float>[] ys = Array.ConvertAll(widths, w => new Memory<float>(new float[m * w]));
                p.GemmSplitHeads(a, ReadOnlySpan<float>.Empty, widths, heads, ys, bias);
                bool same = true;
                int from = 0;
                for (int g = 0; g < widths.Length; g++)
                {
                    float[] y = ys[g].ToArray();
                    int w = widths[g];
                    for (int i = 0; i < m; i++)
                    {
                        for (int j = 0; j < w; j++)
                        {
                            int at = HeadPlace(heads[g], w, seq, i, j);
                            same &= BitConverter.SingleToInt32Bits(y[at]) == BitConverter.SingleToInt32Bits(whole[i * n + from + j]);
                        }
                    }
                    from += w;
                }
                Check(same, "GemmSplitHeads puts every value of GemmSmoothed at its head-layout place");
                // 16-bit data: float16 in and out, and float in with bfloat16 out; every value is the
                // plain GemmSplit's (same types) at its head-layout place.
                foreach (bool f16In in new[] { true, false })
                {
                    ElementType yt = f16In ? ElementType.F16 : ElementType.BF16;
                    ushort[] a16 = Float16Bits.FromSingle(a);
                    Memory<ushort>[] plain = Array.ConvertAll(widths, w => new Memory<ushort>(new ushort[m * w]));
                    Memory<ushort>[] laid = Array.ConvertAll(widths, w => new Memory<ushort>(new ushort[m * w]));
                    if (f16In)
                    {
                        p.GemmSplit(new ReadOnlySpan<ushort>(a16), ElementType.F16, ReadOnlySpan<float>.Empty, widths, plain, yt,
                            new ReadOnlySpan<float>(bias));
                        p.GemmSplitHeads(new ReadOnlySpan<ushort>(a16), ElementType.F16, ReadOnlySpan<float>.Empty, widths, heads,
                            laid, yt, new ReadOnlySpan<float>(bias));
                    }
                    else
                    {
                        p.GemmSplit(new ReadOnlySpan<float>(a), ReadOnlySpan<float>.Empty, widths, plain, yt, new ReadOnlySpan<float>(bias));
                        p.GemmSplitHeads(new ReadOnlySpan<float>(a), ReadOnlySpan<float>.Empty, widths, heads, laid, yt,
                            new ReadOnlySpan<float>(bias));
                    }
                    bool same16 = true;
                    for (int g = 0; g < widths.Length; g++)
                    {
                        ushort[] pl = plain[g].ToArray(), la = laid[g].ToArray();
                        int w = widths[g];
                        for (int i = 0; i < m; i++)
                        {
                            for (int j = 0; j < w; j++)
                            {
                                same16 &= la[HeadPlace(heads[g], w, seq, i, j)] == pl[i * w + j];
                            }
                        }
                    }
                    Check(same16, "GemmSplitHeads (" + (f16In ? "float16" : "float") + " in, " + yt + " out) places GemmSplit's values");
                }
                float[] untouched = Filled(m * 64, 7.5f);
                Memory<float>[] ys2 = { new Memory<float>((float[])untouched.Clone()), new Memory<float>(new float[m * 36]),
                    new Memory<float>(new float[m * 20]) };
                ExpectDynq("GemmSplitHeads seq not dividing m", Status.InvalidArgument, "not whole sequences of 3",
                    () => p.GemmSplitHeads(a, ReadOnlySpan<float>.Empty, widths,
                        new[] { new HeadLayout(4, 3), new HeadLayout(), new HeadLayout() }, ys2, bias));
                ExpectDynq("GemmSplitHeads 5 heads of 64 columns", Status.InvalidArgument, "do not split into 5 heads",
                    () => p.GemmSplitHeads(a, ReadOnlySpan<float>.Empty, widths,
                        new[] { new HeadLayout(5, seq), new HeadLayout(), new HeadLayout() }, ys2, bias));
                Check(ys2[0].Span.SequenceEqual(untouched), "GemmSplitHeads leaves the outputs untouched on errors");
                ArgumentException ae = Expect<ArgumentException>("GemmSplitHeads 2 layouts for 3 outputs",
                    () => p.GemmSplitHeads(a, ReadOnlySpan<float>.Empty, widths, new HeadLayout[2], ys, bias));
                Check(ae != null && ae.ParamName == "heads", "GemmSplitHeads 2 layouts for 3 outputs: " + Describe(ae));
                ae = Expect<ArgumentOutOfRangeException>("GemmSplitHeads negative Seq",
                    () => p.GemmSplitHeads(a, ReadOnlySpan<float>.Empty, widths,
                        new[] { new HeadLayout(4, -1), new HeadLayout(), new HeadLayout() }, ys, bias));
                Check(ae != null && ae.ParamName == "heads", "GemmSplitHeads negative Seq: " + Describe(ae));
            }
        }

        private static void TestGemmSplitErrors()
        {
            Random r = new Random(7);
            using (PackedWeights p = PackedWeights.Pack(RandomArray(r, 6 * 4, 1f, 0f), 6, 4)) // N = 6, K = 4
            {
                const ElementType F16 = ElementType.F16, BF16 = ElementType.BF16;
                float[] good = { 0.5f, 2f, 1.5f, 3f };
                float[] a = RandomArray(r, 8, 1f, 0f); // m = 2
                Func<int[], float[][]> f32 = lengths => Array.ConvertAll(lengths, len => Filled(len, 7.5f));
                Func<int[], ushort[][]> u16 = lengths => Array.ConvertAll(lengths, len => Filled(len, (ushort)0x4700));

                // Lengths and widths checked by the binding.
                ArgumentException ae = Expect<ArgumentException>("GemmSplit 3 widths for 2 outputs",
                    () => p.GemmSplit(a, good, new[] { 2, 4, 0 }, f32(new[] { 4, 8 })));
                Check(ae != null && ae.ParamName == "widths" && ae.Message.Contains("ys has 2 outputs and widths 3 values"),
                    "GemmSplit 3 widths for 2 outputs: " + Describe(ae));
                ae = Expect<ArgumentException>("GemmSplit 7 values for 2 rows of 4",
                    () => p.GemmSplit(a, good, new[] { 2, 4 }, f32(new[] { 4, 7 })));
                Check(ae != null && ae.ParamName == "ys" && ae.Message.Contains("ys[1] has 7 values, expected m * widths[1] = 2 * 4 = 8"),
                    "GemmSplit 7 values for 2 rows of 4: " + Describe(ae));
                ae = Expect<ArgumentException>("GemmSplit 9 values for 2 rows of 4, f16",
                    () => p.GemmSplit(new ushort[8], F16, null, new[] { 2, 4 }, u16(new[] { 4, 9 }), F16));
                Check(ae != null && ae.ParamName == "ys" && ae.Message.Contains("ys[1] has 9 values"),
                    "GemmSplit 9 values, f16: " + Describe(ae));
                ae = Expect<ArgumentException>("GemmSplit values for zero rows",
                    () => p.GemmSplit(new ReadOnlySpan<float>(new float[0]), ReadOnlySpan<float>.Empty, new[] { 2, 4 },
                        new[] { Memory<ushort>.Empty, new Memory<ushort>(new ushort[4]) }, BF16));
                Check(ae != null && ae.ParamName == "ys" && ae.Message.Contains("m * widths[1] = 0 * 4 = 0"),
                    "GemmSplit values for zero rows: " + Describe(ae));
                ae = Expect<ArgumentOutOfRangeException>("GemmSplit negative width",
                    () => p.GemmSplit(a, null, new[] { 8, -2 }, f32(new[] { 16, 0 })));
                Check(ae != null && ae.ParamName == "widths" && ae.Message.Contains("widths[1] = -2 is negative"),
                    "GemmSplit negative width: " + Describe(ae));
                ae = Expect<ArgumentException>("GemmSplit 3 factors", () => p.GemmSplit(a, new float[] { 1, 1, 1 },
                    new[] { 2, 4 }, f32(new[] { 4, 8 })));
                Check(ae != null && ae.ParamName == "smooth", "GemmSplit 3 factors names smooth: " + Describe(ae));
                ae = Expect<ArgumentException>("GemmSplit 5 bias values",
                    () => p.GemmSplit(a, null, new[] { 2, 4 }, f32(new[] { 4, 8 }), new float[5]));
                Check(ae != null && ae.ParamName == "bias", "GemmSplit 5 bias values names bias: " + Describe(ae));
                ae = Expect<ArgumentException>("GemmSplit a not a multiple of K",
                    () => p.GemmSplit(new float[7], null, new[] { 2, 4 }, f32(new[] { 4, 8 })));
                Check(ae != null && ae.ParamName == "a", "GemmSplit a not a multiple of K names a: " + Describe(ae));
                ae = Expect<ArgumentException>("GemmSplit 16-bit outputs typed F32",
                    () => p.GemmSplit(a, null, new[] { 2, 4 }, u16(new[] { 4, 8 }), ElementType.F32));
                Check(ae != null && ae.ParamName == "yType", "GemmSplit F32 for 16-bit outputs names yType: " + Describe(ae));
                ae = Expect<ArgumentException>("GemmSplit 16-bit activations typed F32",
                    () => p.GemmSplit(new ushort[8], ElementType.F32, null, new[] { 2, 4 }, f32(new[] { 4, 8 })));
                Check(ae != null && ae.ParamName == "aType", "GemmSplit F32 for 16-bit activations names aType: " + Describe(ae));
                Expect<ArgumentNullException>("GemmSplit null widths", () => p.GemmSplit(a, null, null, f32(new[] { 4, 8 })));
                Expect<ArgumentNullException>("GemmSplit null outputs", () => p.GemmSplit(a, null, new[] { 2, 4 }, (float[][])null));
                ae = Expect<ArgumentNullException>("GemmSplit a null output",
                    () => p.GemmSplit(a, null, new[] { 2, 4 }, new[] { new ushort[4], null }, F16));
                Check(ae != null && ae.ParamName == "ys" && ae.Message.Contains("ys[1] is null"),
                    "GemmSplit a null output: " + Describe(ae));
                Expect<ArgumentNullException>("GemmSplit null memory outputs",
                    () => p.GemmSplit(new ReadOnlySpan<float>(a), ReadOnlySpan<float>.Empty, new[] { 2, 4 }, (Memory<float>[])null));

                // One element type for all outputs, by signature: float outputs without yType, ushort
                // outputs with one yType for all of them.
                int overloads = 0;
                foreach (MethodInfo mi in typeof(PackedWeights).GetMethods(BindingFlags.Public | BindingFlags.Instance))
                {
                    if (mi.Name != "GemmSplit") continue;
                    overloads++;
                    ParameterInfo[] ps = mi.GetParameters();
                    ParameterInfo outs = Array.Find(ps, pi => pi.Name == "ys");
                    Type element = outs == null ? null : outs.ParameterType.GetElementType();
                    Type value = element == null ? null : element.IsArray ? element.GetElementType() : element.GetGenericArguments()[0];
                    int yTypes = Array.FindAll(ps, pi => pi.Name == "yType").Length;
                    Check(outs != null && outs.ParameterType.IsArray
                            && (value == typeof(float) && yTypes == 0 || value == typeof(ushort) && yTypes == 1),
                        "GemmSplit(" + string.Join(", ", Array.ConvertAll(ps, pi => pi.ParameterType.Name))
                        + "): its outputs share one element type");
                }
                Check(overloads == 12, "GemmSplit has 12 overloads (4 type pairs x arrays, memory, memory without bias): " + overloads);

                // Refused by the library, with its message, every output untouched.
                float[] nanA = (float[])a.Clone();
                nanA[5] = float.NaN;
                float[] inputs = RandomArray(r, 20, 1f, 0f); // a in [0, 8), outputs after
                for (int i = 8; i < inputs.Length; i++) inputs[i] = 7.5f;
                float[] inputsBefore = (float[])inputs.Clone();
                float[] shared = Filled(12, 7.5f);
                float[] sharedBefore = (float[])shared.Clone();
                ExpectSplitRefused(p, "widths 2+3 for N = 6", "output widths [2, 3] must add up to n = 6",
                    f32(new[] { 4, 6 }), ys => p.GemmSplit(a, good, new[] { 2, 3 }, ys));
                ExpectSplitRefused(p, "widths 4+4 for N = 6, bf16", "output widths [4, 4] must add up to n = 6",
                    u16(new[] { 8, 8 }), ys => p.GemmSplit(a, null, new[] { 4, 4 }, ys, BF16));
                ExpectSplitRefused(p, "widths 2+3, zero rows", "output widths [2, 3] must add up to n = 6",
                    f32(new[] { 0, 0 }), ys => p.GemmSplit(new float[0], null, new[] { 2, 3 }, ys));
                ExpectSplitRefused(p, "zero width", "outputs[1].cols is 0",
                    f32(new[] { 12, 0 }), ys => p.GemmSplit(a, good, new[] { 6, 0 }, ys));
                ExpectSplitRefused(p, "zero width, zero rows", "outputs[0].cols is 0",
                    u16(new[] { 0, 0 }), ys => p.GemmSplit(new ushort[0], F16, null, new[] { 0, 6 }, ys, F16));
                ExpectSplitRefused(p, "no outputs", "num_outputs is 0; at least one output is needed",
                    new float[0][], ys => p.GemmSplit(a, good, new int[0], ys));
                ExpectSplitRefused(p, "zero factor", "smoothing factor [1] is 0",
                    f32(new[] { 4, 8 }), ys => p.GemmSplit(a, new float[] { 0.5f, 0f, 1.5f, 3f }, new[] { 2, 4 }, ys));
                ExpectSplitRefused(p, "unknown a type", "a_type=7 is not a dynq_dtype value",
                    u16(new[] { 4, 8 }), ys => p.GemmSplit(new ushort[8], (ElementType)7, null, new[] { 2, 4 }, ys, F16));
                ExpectSplitRefused(p, "unknown output type", "y_type=9 is not a dynq_dtype value",
                    u16(new[] { 4, 8 }), ys => p.GemmSplit(a, null, new[] { 2, 4 }, ys, (ElementType)9));
                ExpectSplitRefused(p, "outputs overlap", "outputs[1].y overlaps outputs[0].y; outputs must be separate buffers",
                    new float[0][], ys => p.GemmSplit(new ReadOnlySpan<float>(a), new ReadOnlySpan<float>(good), new[] { 3, 3 },
                        new[] { new Memory<float>(shared, 0, 6), new Memory<float>(shared, 4, 6) }));
                Check(FirstDifference(shared, sharedBefore) == null, "refused overlapping outputs are left untouched");
                ExpectSplitRefused(p, "output overlaps a", "outputs[1].y overlaps a",
                    new float[0][], ys => p.GemmSplit(new ReadOnlySpan<float>(inputs, 0, 8), ReadOnlySpan<float>.Empty, new[] { 3, 3 },
                        new[] { new Memory<float>(new float[6]), new Memory<float>(inputs, 6, 6) }));
                ExpectSplitRefused(p, "output overlaps smooth", "outputs[0].y overlaps smooth",
                    new float[0][], ys => p.GemmSplit(new ReadOnlySpan<float>(a), new ReadOnlySpan<float>(inputs, 10, 4), new[] { 3, 3 },
                        new[] { new Memory<float>(inputs, 8, 6), new Memory<float>(new float[6]) }));
                Check(FirstDifference(inputs, inputsBefore) == null, "refused outputs overlapping the inputs are left untouched");
                DynqException de = Expect<DynqException>("GemmSplit NaN activation",
                    () => p.GemmSplit(nanA, null, new[] { 2, 4 }, u16(new[] { 4, 8 }), F16));
                Check(de != null && de.Status == Status.NonFinite && de.LibraryMessage.Contains("A[1][1] is NaN"),
                    "GemmSplit NaN activation: " + (de == null ? "no exception" : de.Status + ": " + de.LibraryMessage));

                // The same array twice: refused by the library for every element type, untouched.
                float[] y32 = Filled(6, 7.5f);
                ExpectSplitRefused(p, "one array twice (F32)", "outputs[1].y overlaps outputs[0].y",
                    new float[0][], ys => p.GemmSplit(a, good, new[] { 3, 3 }, new[] { y32, y32 }));
                Check(Array.TrueForAll(y32, v => v == 7.5f), "a refused GemmSplit (one array twice, F32) leaves it untouched");
                foreach (ElementType yt in new[] { F16, BF16 })
                {
                    ushort[] y16 = Filled(6, (ushort)0x4700);
                    de = Expect<DynqException>("GemmSplit one array twice (" + yt + ")",
                        () => p.GemmSplit(new ushort[8], F16, good, new[] { 3, 3 }, new[] { y16, y16 }, yt));
                    Check(de != null && de.Status == Status.InvalidArgument && de.Function == "dynq_gemm_split"
                            && de.LibraryMessage == "outputs[1].y overlaps outputs[0].y; outputs must be separate buffers",
                        "GemmSplit one array twice (" + yt + "): "
                        + (de == null ? "no exception" : de.Status + ", " + de.Function + ": " + de.LibraryMessage));
                    Check(Array.TrueForAll(y16, v => v == 0x4700),
                        "a refused GemmSplit (one array twice, " + yt + ") leaves it untouched");
                }
            }

            PackedWeights disposed = PackedWeights.Pack(new float[] { 1, 2, 3, 4 }, 2, 2);
            disposed.Dispose();
            Expect<ObjectDisposedException>("GemmSplit after Dispose",
                () => disposed.GemmSplit(new float[] { 1, 1 }, null, new[] { 1, 1 }, new[] { new float[1], new float[1] }));
        }

        // A GemmSplit call refused by the library with InvalidArgument and the message, leaving
        // the outputs (float or ushort arrays, filled by the caller) untouched.
        private static void ExpectSplitRefused<T>(PackedWeights p, string what, string message, T[][] ys, Action<T[][]> call)
        {
            T[][] before = Array.ConvertAll(ys, y => (T[])y.Clone());
            ExpectDynq("GemmSplit " + what, Status.InvalidArgument, message, () => call(ys));
            bool same = true;
            for (int g = 0; g < ys.Length; g++)
            {
                for (int i = 0; i < ys[g].Length; i++) same = same && ys[g][i].Equals(before[g][i]);
            }
            Check(same, "a refused GemmSplit (" + what + ") leaves every output untouched");
        }

        private static ReadOnlySpan<float> SpanOf(float[] v)
        {
            return v == null ? ReadOnlySpan<float>.Empty : new ReadOnlySpan<float>(v);
        }

        private static T[] Filled<T>(int count, T value)
        {
            T[] v = new T[count];
            for (int i = 0; i < count; i++) v[i] = value;
            return v;
        }

        private static string Describe(ArgumentException e)
        {
            return e == null ? "no exception" : e.GetType().Name + " " + e.ParamName + ": " + e.Message;
        }
    }
}
