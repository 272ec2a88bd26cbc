// Tests of the C# binding: packing, GEMM against the reference bit for bit in every
// configuration, array and span overloads, GEMM on float16 and bfloat16 against the float GEMM
// and the 16-bit conversions, GEMM with smoothing factors (Smoothed.cs), with a residual
// (Residual.cs) and with its columns split into several outputs (Split.cs), serialization,
// every error path (as DynqException with the library's status and message, or
// ArgumentException for lengths checked in C#), disposal and concurrent use.
// A console program: prints "N passed, N failed", exit code 1 on any failure.
// DYNQ_HEADER=<path of dynq.h>, when set, is checked against the enums here.
using System;
using System.Collections.Generic;
using System.IO;
using System.Text.RegularExpressions;
using System.Threading;

namespace Dynq.Tests
{
    internal static partial class Program
    {
        private static int _passed;
        private static int _failed;

        private static void Check(bool ok, string what)
        {
            if (ok)
            {
                _passed++;
            }
            else
            {
                _failed++;
                Console.WriteLine("FAIL " + what);
            }
        }

        private static void Run(string name, Action body)
        {
            try
            {
                body();
            }
            catch (Exception e)
            {
                _failed++;
                Console.WriteLine("FAIL " + name + ": unexpected " + e);
            }
        }

        private static T Expect<T>(string what, Action body) where T : Exception
        {
            try
            {
                body();
            }
            catch (T e)
            {
                _passed++;
                return e;
            }
            catch (Exception e)
            {
                Check(false, what + ": threw " + e.GetType().Name + " (" + e.Message + "), expected " + typeof(T).Name);
                return null;
            }
            Check(false, what + ": no exception, expected " + typeof(T).Name);
            return null;
        }

        private static void ExpectDynq(string what, Status status, string needle, Action body)
        {
            DynqException e = Expect<DynqException>(what, body);
            if (e == null) return;
            Check(e.Status == status, what + ": status " + e.Status + ", expected " + status + " (" + e.Message + ")");
            Check(!string.IsNullOrEmpty(e.LibraryMessage) && e.LibraryMessage.Contains(needle),
                what + ": library message \"" + e.LibraryMessage + "\" should contain \"" + needle + "\"");
            Check(e.Message.Contains(e.LibraryMessage) && e.Message.Contains(DynqLibrary.StatusString(status)),
                what + ": Message \"" + e.Message + "\" should carry the status and the library's message");
        }

        private static float[] RandomArray(Random r, int count, float scale, float offset)
        {
            float[] v = new float[count];
            for (int i = 0; i < count; i++) v[i] = (float)(r.NextDouble() * 2 - 1) * scale + offset;
            return v;
        }

        private static string FirstDifference(float[] got, float[] want)
        {
            if (got.Length != want.Length) return "lengths " + got.Length + " and " + want.Length;
            for (int i = 0; i < got.Length; i++)
            {
                if (BitConverter.ToInt32(BitConverter.GetBytes(got[i]), 0) != BitConverter.ToInt32(BitConverter.GetBytes(want[i]), 0))
                {
                    return "element " + i + ": " + got[i].ToString("R") + ", reference " + want[i].ToString("R");
                }
            }
            return null;
        }

        private static void TestVersionAndHeader()
        {
            Check(!string.IsNullOrEmpty(DynqLibrary.Version), "Version is set");
            Check(DynqLibrary.AbiVersion == DynqLibrary.HeaderAbiVersion,
                "library ABI " + DynqLibrary.AbiVersion + " equals the binding's " + DynqLibrary.HeaderAbiVersion);
            Isa active = DynqLibrary.ActiveIsa;
            Check(active != Isa.Auto && DynqLibrary.IsaAvailable(active) && DynqLibrary.IsaName(active) != "unknown",
                "ActiveIsa " + active + " is available");
            Check(DynqLibrary.StatusString((Status)999) == "unknown status", "StatusString of an unknown status");

            string header = Environment.GetEnvironmentVariable("DYNQ_HEADER");
            if (string.IsNullOrEmpty(header))
            {
                Console.WriteLine("note: DYNQ_HEADER not set; enum values not compared with dynq.h");
                return;
            }
            string text = File.ReadAllText(header);
            Match abi = Regex.Match(text, @"#define DYNQ_ABI_VERSION (\d+)");
            Check(abi.Success && int.Parse(abi.Groups[1].Value) == DynqLibrary.HeaderAbiVersion,
                "HeaderAbiVersion equals DYNQ_ABI_VERSION of " + header);
            Match ver = Regex.Match(text, "#define DYNQ_VERSION_STRING \"([^\"]+)\"");
            Check(ver.Success && ver.Groups[1].Value == DynqLibrary.Version, "Version equals DYNQ_VERSION_STRING");
            CompareEnum(text, typeof(Status), "DYNQ_STATUS_");
            CompareEnum(text, typeof(WeightLayout), "DYNQ_WEIGHT_LAYOUT_");
            CompareEnum(text, typeof(WeightGranularity), "DYNQ_WEIGHT_GRANULARITY_");
            CompareEnum(text, typeof(ActGranularity), "DYNQ_ACT_GRANULARITY_");
            CompareEnum(text, typeof(ActType), "DYNQ_ACT_TYPE_");
            CompareEnum(text, typeof(Epilogue), "DYNQ_EPILOGUE_");
            CompareEnum(text, typeof(Isa), "DYNQ_ISA_");
            CompareEnum(text, typeof(ElementType), "DYNQ_DTYPE_");
        }

        // Every constant PREFIX_NAME = value of the header has a C# member whose name, in upper
        // snake case, is NAME with the same value, and the other way round.
        private static void CompareEnum(string header, Type type, string prefix)
        {
            var inHeader = new Dictionary<string, ulong>();
            foreach (Match m in Regex.Matches(header, prefix + @"([A-Z0-9_]+) = (\d+)"))
            {
                inHeader[m.Groups[1].Value] = ulong.Parse(m.Groups[2].Value);
            }
            Check(inHeader.Count > 0, "dynq.h defines " + prefix + "*");
            var names = Enum.GetNames(type);
            Check(names.Length == inHeader.Count, type.Name + " has " + names.Length + " members, dynq.h " + inHeader.Count);
            foreach (string name in names)
            {
                string snake = Regex.Replace(name, "(?<=[a-z0-9])([A-Z])", "_$1").ToUpperInvariant();
                ulong value = Convert.ToUInt64(Enum.Parse(type, name));
                ulong want;
                Check(inHeader.TryGetValue(snake, out want) && want == value,
                    type.Name + "." + name + " = " + value + " matches " + prefix + snake);
            }
        }

        private struct GemmCase
        {
            public string Name;
            public int M, N, K;
            public WeightLayout Layout;
            public WeightGranularity Weights;
            public GemmOptions Options;
            public bool Bias;
            public float Scale, Skew;

            public GemmCase(string name, int m, int n, int k, WeightLayout layout = WeightLayout.NK,
                WeightGranularity weights = WeightGranularity.PerChannel, GemmOptions options = null,
                bool bias = true, float scale = 1f, float skew = 0f)
            {
                Name = name;
                M = m;
                N = n;
                K = k;
                Layout = layout;
                Weights = weights;
                Options = options;
                Bias = bias;
                Scale = scale;
                Skew = skew;
            }
        }

        private static void TestGemmMatchesReference()
        {
            GemmCase[] cases =
            {
                new GemmCase("1x1x1", 1, 1, 1),
                new GemmCase("defaults", 3, 17, 33, scale: 3f),
                new GemmCase("no bias", 4, 9, 64, bias: false),
                new GemmCase("skewed rows", 7, 40, 130, skew: 2f),
                new GemmCase("KN layout", 5, 24, 48, layout: WeightLayout.KN, scale: 2f),
                new GemmCase("per-tensor weights", 6, 31, 65, weights: WeightGranularity.PerTensor),
                new GemmCase("per-tensor activations", 8, 16, 96,
                    options: new GemmOptions { ActGranularity = ActGranularity.PerTensor }, scale: 4f),
                new GemmCase("symmetric int8", 9, 33, 77, options: new GemmOptions { ActType = ActType.SymmetricI8 }),
                new GemmCase("relu", 5, 20, 40, options: new GemmOptions { Epilogue = Epilogue.Relu }),
                new GemmCase("everything non-default, one thread", 12, 50, 200, layout: WeightLayout.KN,
                    weights: WeightGranularity.PerTensor,
                    options: new GemmOptions
                    {
                        ActGranularity = ActGranularity.PerTensor, ActType = ActType.SymmetricI8,
                        Epilogue = Epilogue.Relu, NumThreads = 1,
                    }, scale: 2f, skew: -1f),
                new GemmCase("two threads", 33, 96, 512, options: new GemmOptions { NumThreads = 2 }),
                new GemmCase("zero rows", 0, 8, 16),
            };
            int seed = 1;
            foreach (GemmCase c in cases)
            {
                Run(c.Name, () =>
                {
                    Random r = new Random(seed++);
                    float[] wNK = RandomArray(r, c.N * c.K, 0.5f, 0f);
                    float[] w = wNK;
                    if (c.Layout == WeightLayout.KN)
                    {
                        w = new float[wNK.Length];
                        for (int j = 0; j < c.N; j++)
                            for (int kk = 0; kk < c.K; kk++) w[kk * c.N + j] = wNK[j * c.K + kk];
                    }
                    using (PackedWeights p = PackedWeights.Pack(w, c.N, c.K, c.Layout,
                        new PackOptions { Granularity = c.Weights }))
                    {
                        Check(p.N == c.N && p.K == c.K, c.Name + ": N and K");
                        float[] a = RandomArray(r, c.M * c.K, c.Scale, c.Skew);
                        float[] bias = c.Bias ? RandomArray(r, c.N, 1f, 0f) : null;
                        float[] y = p.Forward(a, bias, c.Options);
                        sbyte[] q;
                        float[] sw;
                        Reference.QuantizeWeights(wNK, c.N, c.K, c.Weights == WeightGranularity.PerTensor, out q, out sw);
                        string diff = FirstDifference(y, Reference.Gemm(a, c.M, c.K, q, sw, c.N, bias, c.Options));
                        Check(diff == null, c.Name + ": Gemm equals the reference bit for bit: " + diff);
                    }
                });
            }
        }

        private static unsafe void TestSpans()
        {
            Random r = new Random(21);
            int m = 4, n = 10, k = 12;
            using (PackedWeights p = PackedWeights.Pack(RandomArray(r, n * k, 1f, 0f), n, k))
            {
                float[] a = RandomArray(r, m * k, 1f, 0.5f);
                float[] bias = RandomArray(r, n, 1f, 0f);
                float[] want = new float[m * n];
                p.Gemm(a, want, bias);

                // The same rows inside larger buffers, as spans.
                float[] bigA = new float[a.Length + 7];
                Array.Copy(a, 0, bigA, 3, a.Length);
                float[] bigY = new float[m * n + 5];
                float[] bigBias = new float[n + 2];
                Array.Copy(bias, 0, bigBias, 1, n);
                p.Gemm(new ReadOnlySpan<float>(bigA, 3, a.Length), new Span<float>(bigY, 2, m * n),
                    new ReadOnlySpan<float>(bigBias, 1, n));
                float[] got = new Span<float>(bigY, 2, m * n).ToArray();
                Check(FirstDifference(got, want) == null, "span overload equals the array overload");
                Check(bigY[0] == 0f && bigY[1] == 0f && bigY[m * n + 2] == 0f, "span overload writes only its span");

                // Without bias, stack memory as output.
                float* stackBuf = stackalloc float[m * n];
                Span<float> stackY = new Span<float>(stackBuf, m * n);
                p.Gemm(new ReadOnlySpan<float>(a), stackY);
                float[] noBias = p.Forward(a);
                Check(FirstDifference(stackY.ToArray(), noBias) == null, "stackalloc output equals Forward");

                // Pack from a span.
                float[] wBig = RandomArray(r, n * k + 4, 1f, 0f);
                using (PackedWeights p2 = PackedWeights.Pack(new ReadOnlySpan<float>(wBig, 4, n * k), n, k))
                using (PackedWeights p3 = PackedWeights.Pack(new ReadOnlySpan<float>(wBig, 4, n * k).ToArray(), n, k))
                {
                    Check(FirstDifference(p2.Forward(a), p3.Forward(a)) == null, "Pack from a span equals Pack from an array");
                }
            }
        }

        // GELU uses dynq's own erf and tanh approximations: each form is compared with its
        // formula in double precision within a tolerance, applied to the output without
        // epilogue, and must differ from the other form (they differ by up to 4.7e-4).
        private static void TestGelu()
        {
            Random r = new Random(5);
            int n = 24, k = 40, m = 6;
            Func<double, double> erfForm = x => 0.5 * x * (1 + Erf(x / Math.Sqrt(2)));
            Func<double, double> tanhForm = x => 0.5 * x * (1 + Math.Tanh(Math.Sqrt(2 / Math.PI) * (x + 0.044715 * x * x * x)));
            using (PackedWeights p = PackedWeights.Pack(RandomArray(r, n * k, 1f, 0f), n, k))
            {
                float[] a = RandomArray(r, m * k, 2f, 0f);
                float[] bias = RandomArray(r, n, 1f, 0f);
                float[] plain = p.Forward(a, bias);
                Func<double, double> siluForm = x => x / (1 + Math.Exp(-x));
                Func<double, double> quickForm = x => x / (1 + Math.Exp(-1.702 * x));
                foreach (var form in new[] {
                    Tuple.Create(Epilogue.Gelu, erfForm, tanhForm, "erf"),
                    Tuple.Create(Epilogue.GeluTanh, tanhForm, erfForm, "tanh"),
                    Tuple.Create(Epilogue.Silu, siluForm, quickForm, "silu"),
                    Tuple.Create(Epilogue.QuickGelu, quickForm, siluForm, "quick") })
                {
                    float[] gelu = p.Forward(a, bias, new GemmOptions { Epilogue = form.Item1 });
                    int bad = -1;
                    double maxOther = 0;
                    for (int i = 0; i < plain.Length; i++)
                    {
                        double want = form.Item2(plain[i]);
                        if (bad < 0 && Math.Abs(gelu[i] - want) > 2e-6 * (1 + Math.Abs(want))) bad = i;
                        maxOther = Math.Max(maxOther, Math.Abs(gelu[i] - form.Item3(plain[i])));
                    }
                    Check(bad < 0, "GELU " + form.Item4 + " form epilogue matches its formula" +
                        (bad < 0 ? "" : ": element " + bad + " GELU(" + plain[bad] + ") = " + gelu[bad]));
                    Check(maxOther > 5e-5, "GELU " + form.Item4 + " form differs from the other form (by " + maxOther + ")");
                }
            }
        }

        // erf in double precision (.NET has none): the Maclaurin series below 2.5, where its
        // terms stay small, and the continued fraction of erfc above.
        private static double Erf(double x)
        {
            double ax = Math.Abs(x), r;
            if (ax < 2.5)
            {
                double sum = 0, term = ax;
                for (int i = 0; i < 100; i++)
                {
                    double add = term / (2 * i + 1);
                    sum += add;
                    if (Math.Abs(add) < 1e-17 * Math.Abs(sum)) break;
                    term *= -ax * ax / (i + 1);
                }
                r = 2 / Math.Sqrt(Math.PI) * sum;
            }
            else
            {
                // erfc x = exp(-x^2) / sqrt(pi) / (x + (1/2) / (x + 1 / (x + (3/2) / (x + ...))))
                double f = ax;
                for (int n = 80; n >= 1; n--) f = ax + (n / 2.0) / f;
                r = 1 - Math.Exp(-ax * ax) / Math.Sqrt(Math.PI) / f;
            }
            return x < 0 ? -r : r;
        }

        private static void TestPackQuantized()
        {
            Random r = new Random(100);
            foreach (int scalesCount in new[] { 1, 13 })
            {
                int n = 13, k = 29, m = 6;
                sbyte[] q = new sbyte[n * k];
                for (int i = 0; i < q.Length; i++) q[i] = (sbyte)(r.Next(256) - 128);
                float[] scales = RandomArray(r, scalesCount, 0.01f, 0.02f);
                using (PackedWeights p = PackedWeights.PackQuantized(q, n, k, scales))
                {
                    float[] a = RandomArray(r, m * k, 1f, 0.3f);
                    string diff = FirstDifference(p.Forward(a), Reference.Gemm(a, m, k, q, scales, n, null, null));
                    Check(diff == null, "PackQuantized with " + scalesCount + " scales equals the reference: " + diff);
                }
            }
        }

        // WeightQmax 64: weights in [-64, 64] (the blob says so), the narrow-weight kernel where the
        // CPU's ISA has one (AVX2 without VNNI), the bits of the same weights on the scalar kernel,
        // and values outside 1..127 refused.
        private static void TestWeightQmax()
        {
            Random r = new Random(64);
            int n = 21, k = 50, m = 4;
            float[] w = RandomArray(r, n * k, 1f, 0f);
            using (PackedWeights p = PackedWeights.Pack(w, n, k, WeightLayout.NK, new PackOptions { WeightQmax = 64 }))
            {
                byte[] blob = p.Serialize();
                int max = 0;
                for (int i = 0; i < n * k; i++) max = Math.Max(max, Math.Abs((int)(sbyte)blob[48 + 4 * n + i]));
                Check(max == 64, "WeightQmax 64: largest |q| is 64, got " + max);
                PackedWeightsInfo info = p.Info;
                Check(info.Isa != Isa.Avx2 || info.KernelName.EndsWith("_narrow", StringComparison.Ordinal),
                    "AVX2 runs 7-bit weights with its narrow-weight kernel: " + info.KernelName);
                using (PackedWeights scalar = PackedWeights.Load(new ReadOnlySpan<byte>(blob), new PackOptions { Isa = Isa.Scalar }))
                {
                    float[] a = RandomArray(r, m * k, 2f, 0f);
                    Check(FirstDifference(p.Forward(a), scalar.Forward(a)) == null, info.KernelName + " gives the scalar kernel's bits");
                }
            }
            foreach (int bad in new[] { -1, 128, 1000 })
            {
                ExpectDynq("WeightQmax " + bad, Status.InvalidArgument, "weight_qmax",
                    () => PackedWeights.Pack(w, n, k, WeightLayout.NK, new PackOptions { WeightQmax = bad }).Dispose());
            }
        }

        private static void TestSerializeAndLoad()
        {
            Random r = new Random(7);
            int n = 33, k = 70, m = 5;
            using (PackedWeights p = PackedWeights.Pack(RandomArray(r, n * k, 1f, 0f), n, k))
            {
                byte[] blob = p.Serialize();
                PackedWeightsInfo info = p.Info;
                Check(blob.Length == info.SerializedBytes, "Serialize writes SerializedBytes");
                Check(blob.Length > 8 && blob[0] == (byte)'D' && blob[6] == (byte)'T' && blob[7] == 0, "blob magic");
                Check(!string.IsNullOrEmpty(info.KernelName) && info.MR > 0 && info.NR > 0 && info.KR > 0 && info.Bytes > 0,
                    "Info is filled in: " + info.KernelName);
                float[] a = RandomArray(r, m * k, 2f, 0f);
                float[] want = p.Forward(a);
                using (PackedWeights loaded = PackedWeights.Load(blob))
                using (PackedWeights scalar = PackedWeights.Load(new ReadOnlySpan<byte>(blob), new PackOptions { Isa = Isa.Scalar }))
                {
                    Check(scalar.Info.Isa == Isa.Scalar, "Load for the scalar kernel");
                    Check(FirstDifference(loaded.Forward(a), want) == null, "loaded weights give the same bits");
                    Check(FirstDifference(scalar.Forward(a), want) == null, "loaded scalar weights give the same bits");
                    Check(Convert.ToBase64String(loaded.Serialize()) == Convert.ToBase64String(blob),
                        "Serialize(Load(blob)) == blob");
                }
            }
        }

        private static void TestErrors()
        {
            Random r = new Random(3);
            using (PackedWeights p = PackedWeights.Pack(RandomArray(r, 6 * 4, 1f, 0f), 6, 4))
            {
                byte[] blob = p.Serialize();
                float[] nanW = RandomArray(r, 6 * 4, 1f, 0f);
                nanW[5] = float.NaN;
                float[] infA = new float[8];
                infA[6] = float.PositiveInfinity;

                // Refused by the library, with its message.
                ExpectDynq("Pack n = 0", Status.InvalidArgument, "n=0", () => PackedWeights.Pack(new float[0], 0, 4));
                ExpectDynq("Pack k above 65536", Status.Unsupported, "65536",
                    () => PackedWeights.Pack(new float[65537], 1, 65537));
                ExpectDynq("Pack NaN weights", Status.NonFinite, "", () => PackedWeights.Pack(nanW, 6, 4));
                ExpectDynq("Pack unknown layout", Status.InvalidArgument, "layout",
                    () => PackedWeights.Pack(new float[4], 2, 2, (WeightLayout)7));
                ExpectDynq("Pack unknown ISA", Status.InvalidArgument, "isa",
                    () => PackedWeights.Pack(new float[4], 2, 2, WeightLayout.NK, new PackOptions { Isa = (Isa)99 }));
                ExpectDynq("PackQuantized wrong scale count", Status.InvalidArgument, "num_scales",
                    () => PackedWeights.PackQuantized(new sbyte[6], 2, 3, new float[3]));
                ExpectDynq("Gemm infinite activation", Status.NonFinite, "A[1][2]", () => p.Forward(infA));
                ExpectDynq("Gemm unknown epilogue", Status.InvalidArgument, "epilogue",
                    () => p.Forward(new float[4], null, new GemmOptions { Epilogue = (Epilogue)9 }));
                float[] y = { 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7 };
                ExpectDynq("Gemm NaN bias", Status.NonFinite, "bias",
                    () => p.Gemm(new float[8], y, new float[] { 0, 0, float.NaN, 0, 0, 0 }));
                Check(Array.TrueForAll(y, v => v == 7f), "a failing Gemm leaves y untouched");

                // Lengths checked by the binding.
                Expect<ArgumentException>("Pack array shorter than n*k", () => PackedWeights.Pack(new float[5], 2, 3));
                Expect<ArgumentOutOfRangeException>("Pack negative shape", () => PackedWeights.Pack(new float[0], -1, 3));
                ArgumentException ae = Expect<ArgumentException>("Gemm a not a multiple of K", () => p.Forward(new float[7]));
                Check(ae != null && ae.Message.Contains("multiple of K = 4") && ae.ParamName == "a", "message names a and K");
                Expect<ArgumentException>("Gemm y of the wrong length", () => p.Gemm(new float[8], new float[11]));
                Expect<ArgumentException>("Gemm bias of the wrong length", () => p.Forward(new float[8], new float[5]));
                Expect<ArgumentOutOfRangeException>("Gemm negative threads",
                    () => p.Forward(new float[4], null, new GemmOptions { NumThreads = -1 }));
                Expect<ArgumentNullException>("Pack null array", () => PackedWeights.Pack((float[])null, 1, 1));

                // Corrupt blobs.
                foreach (int pos in new[] { 0, 30, blob.Length / 2, blob.Length - 1 })
                {
                    byte[] bad = (byte[])blob.Clone();
                    bad[pos] ^= 0x10;
                    ExpectDynq("Load with byte " + pos + " flipped", Status.CorruptData, "", () => PackedWeights.Load(bad));
                }
                byte[] truncated = new byte[blob.Length - 1];
                Array.Copy(blob, truncated, truncated.Length);
                ExpectDynq("Load truncated", Status.CorruptData, "", () => PackedWeights.Load(truncated));
                ExpectDynq("Load empty", Status.CorruptData, "", () => PackedWeights.Load(new byte[0]));
            }
        }

        private static void TestDispose()
        {
            PackedWeights p = PackedWeights.Pack(new float[] { 1, 2, 3, 4 }, 2, 2);
            p.Dispose();
            p.Dispose();
            Check(p.IsDisposed, "IsDisposed after Dispose");
            Expect<ObjectDisposedException>("Gemm after Dispose", () => p.Forward(new float[] { 1, 1 }));
            Expect<ObjectDisposedException>("Serialize after Dispose", () => p.Serialize());
            // Dropped without Dispose: the SafeHandle's finalizer frees the native memory.
            for (int i = 0; i < 50; i++) PackedWeights.Pack(new float[64 * 64], 64, 64);
            GC.Collect();
            GC.WaitForPendingFinalizers();
            Check(true, "finalizing undisposed weights");
        }

        private static void TestConcurrentGemm()
        {
            Random r = new Random(11);
            int n = 64, k = 128, m = 9;
            using (PackedWeights p = PackedWeights.Pack(RandomArray(r, n * k, 1f, 0f), n, k))
            {
                float[] a = RandomArray(r, m * k, 1f, 0.5f);
                float[] want = p.Forward(a, null, new GemmOptions { NumThreads = 1 });
                int mismatches = 0;
                Exception error = null;
                var threads = new List<Thread>();
                for (int t = 0; t < 6; t++)
                {
                    int threadsPerCall = t % 3;
                    var th = new Thread(() =>
                    {
                        try
                        {
                            for (int it = 0; it < 20; it++)
                            {
                                if (FirstDifference(p.Forward(a, null, new GemmOptions { NumThreads = threadsPerCall }), want) != null)
                                {
                                    Interlocked.Increment(ref mismatches);
                                }
                            }
                        }
                        catch (Exception e)
                        {
                            error = e;
                        }
                    });
                    threads.Add(th);
                    th.Start();
                }
                foreach (Thread th in threads) th.Join();
                Check(error == null && mismatches == 0,
                    "concurrent Gemm on one handle: " + mismatches + " mismatches, error " + error);
            }
        }

        // ---- float16 and bfloat16 -------------------------------------------------------------

        private static float Bits(uint b) { return BitConverter.Int32BitsToSingle(unchecked((int)b)); }

        private static uint BitsOf(float f) { return unchecked((uint)BitConverter.SingleToInt32Bits(f)); }

        // Bits equal, except that any NaN equals any NaN.
        private static bool SameFloat(float got, float want)
        {
            return float.IsNaN(want) ? float.IsNaN(got) : BitsOf(got) == BitsOf(want);
        }

        private static bool IsNaN16(ushort b, ElementType t)
        {
            return t == ElementType.BF16 ? (b & 0x7f80) == 0x7f80 && (b & 0x7f) != 0 : (b & 0x7c00) == 0x7c00 && (b & 0x3ff) != 0;
        }

        private static float NextUp(float x) { return Bits(x >= 0 ? BitsOf(x) + 1 : BitsOf(x) - 1); }

        private static float NextDown(float x) { return x > 0 ? Bits(BitsOf(x) - 1) : -NextUp(-x); }

        private static ushort[] Narrow(float[] v, ElementType t)
        {
            return t == ElementType.F16 ? Float16Bits.FromSingle(v) : BFloat16Bits.FromSingle(v);
        }

        private static float[] Widen(ushort[] b, ElementType t)
        {
            return t == ElementType.F16 ? Float16Bits.ToSingle(b) : BFloat16Bits.ToSingle(b);
        }

        private static string FirstDifference(ushort[] got, ushort[] want)
        {
            if (got.Length != want.Length) return "lengths " + got.Length + " and " + want.Length;
            for (int i = 0; i < got.Length; i++)
            {
                if (got[i] != want[i]) return "element " + i + ": 0x" + got[i].ToString("x4") + ", expected 0x" + want[i].ToString("x4");
            }
            return null;
        }

        private static void TestConversionsKnown()
        {
            var f16 = new List<Tuple<string, float, ushort>>
            {
                Tuple.Create("one", 1f, (ushort)0x3c00),
                Tuple.Create("minus two", -2f, (ushort)0xc000),
                Tuple.Create("negative zero", Bits(0x80000000), (ushort)0x8000),
                Tuple.Create("0.1 rounds down", 0.1f, (ushort)0x2e66),
                Tuple.Create("1/3", 1f / 3, (ushort)0x3555),
                Tuple.Create("max", 65504f, (ushort)0x7bff),
                Tuple.Create("just below the overflow tie", NextDown(65520f), (ushort)0x7bff),
                Tuple.Create("overflow tie goes to infinity (even)", 65520f, (ushort)0x7c00),
                Tuple.Create("overflow", 1e6f, (ushort)0x7c00),
                Tuple.Create("negative overflow", -1e30f, (ushort)0xfc00),
                Tuple.Create("infinity", float.PositiveInfinity, (ushort)0x7c00),
                Tuple.Create("negative infinity", float.NegativeInfinity, (ushort)0xfc00),
                Tuple.Create("smallest normal", 1f / (1 << 14), (ushort)0x0400),
                Tuple.Create("largest subnormal", 1023f / (1 << 24), (ushort)0x03ff),
                Tuple.Create("smallest subnormal", 1f / (1 << 24), (ushort)0x0001),
                Tuple.Create("negative smallest subnormal", -1f / (1 << 24), (ushort)0x8001),
                Tuple.Create("tie between subnormal and normal goes up (even)", 1023.5f / (1 << 24), (ushort)0x0400),
                Tuple.Create("half the smallest subnormal ties to zero", 1f / (1 << 25), (ushort)0x0000),
                Tuple.Create("just above half the smallest subnormal", NextUp(1f / (1 << 25)), (ushort)0x0001),
                Tuple.Create("1.5 smallest subnormals ties to 2", 3f / (1 << 25), (ushort)0x0002),
                Tuple.Create("2.5 smallest subnormals ties to 2", 5f / (1 << 25), (ushort)0x0002),
                Tuple.Create("float32 subnormal underflows", Bits(0x00000001), (ushort)0x0000),
                Tuple.Create("negative float32 subnormal underflows", Bits(0x80000001), (ushort)0x8000),
                Tuple.Create("tie above 1 goes down (even)", 1 + 1f / (1 << 11), (ushort)0x3c00),
                Tuple.Create("tie above 1+ulp goes up (even)", 1 + 3f / (1 << 11), (ushort)0x3c02),
                Tuple.Create("just above the tie", NextUp(1 + 1f / (1 << 11)), (ushort)0x3c01),
                Tuple.Create("carry into the exponent", NextDown(2f), (ushort)0x4000),
                Tuple.Create("quiet NaN", Bits(0x7fc00000), (ushort)0x7e00),
                Tuple.Create("negative NaN", Bits(0xffc00000), (ushort)0xfe00),
                Tuple.Create("NaN payload only in the low bits stays NaN", Bits(0x7f800001), (ushort)0x7e00),
                Tuple.Create("NaN keeps its leading payload", Bits(0x7fa02000), (ushort)0x7f01),
            };
            foreach (var c in f16)
            {
                ushort got = Float16Bits.FromSingle(c.Item2);
                Check(got == c.Item3, "Float16Bits.FromSingle, " + c.Item1 + ": 0x" + got.ToString("x4") + ", expected 0x" + c.Item3.ToString("x4"));
            }
            var bf16 = new List<Tuple<string, float, ushort>>
            {
                Tuple.Create("one", 1f, (ushort)0x3f80),
                Tuple.Create("minus two", -2f, (ushort)0xc000),
                Tuple.Create("negative zero", Bits(0x80000000), (ushort)0x8000),
                Tuple.Create("pi rounds down", (float)Math.PI, (ushort)0x4049),
                Tuple.Create("0.1 rounds up", 0.1f, (ushort)0x3dcd),
                Tuple.Create("max", Bits(0x7f7f0000), (ushort)0x7f7f),
                Tuple.Create("max float overflows", float.MaxValue, (ushort)0x7f80),
                Tuple.Create("overflow tie goes to infinity (even)", Bits(0x7f7f8000), (ushort)0x7f80),
                Tuple.Create("just below the overflow tie", Bits(0x7f7f7fff), (ushort)0x7f7f),
                Tuple.Create("infinity", float.PositiveInfinity, (ushort)0x7f80),
                Tuple.Create("negative infinity", float.NegativeInfinity, (ushort)0xff80),
                Tuple.Create("tie above 1 goes down (even)", 1 + 1f / (1 << 8), (ushort)0x3f80),
                Tuple.Create("tie above 1+ulp goes up (even)", 1 + 3f / (1 << 8), (ushort)0x3f82),
                Tuple.Create("just above the tie", NextUp(1 + 1f / (1 << 8)), (ushort)0x3f81),
                Tuple.Create("smallest subnormal", Bits(0x00010000), (ushort)0x0001),
                Tuple.Create("subnormal tie to zero", Bits(0x00008000), (ushort)0x0000),
                Tuple.Create("subnormal tie to 2", Bits(0x00018000), (ushort)0x0002),
                Tuple.Create("largest subnormal rounds to the smallest normal", Bits(0x007fffff), (ushort)0x0080),
                Tuple.Create("quiet NaN", Bits(0x7fc00000), (ushort)0x7fc0),
                Tuple.Create("negative NaN", Bits(0xffc00000), (ushort)0xffc0),
                Tuple.Create("NaN payload only in the low bits stays NaN", Bits(0x7f800001), (ushort)0x7fc0),
            };
            foreach (var c in bf16)
            {
                ushort got = BFloat16Bits.FromSingle(c.Item2);
                Check(got == c.Item3, "BFloat16Bits.FromSingle, " + c.Item1 + ": 0x" + got.ToString("x4") + ", expected 0x" + c.Item3.ToString("x4"));
            }
            var widen = new List<Tuple<string, ElementType, ushort, float>>
            {
                Tuple.Create("f16 one", ElementType.F16, (ushort)0x3c00, 1f),
                Tuple.Create("f16 max", ElementType.F16, (ushort)0x7bff, 65504f),
                Tuple.Create("f16 smallest normal", ElementType.F16, (ushort)0x0400, 1f / (1 << 14)),
                Tuple.Create("f16 largest subnormal", ElementType.F16, (ushort)0x03ff, 1023f / (1 << 24)),
                Tuple.Create("f16 smallest subnormal", ElementType.F16, (ushort)0x0001, 1f / (1 << 24)),
                Tuple.Create("f16 negative subnormal", ElementType.F16, (ushort)0x8201, -513f / (1 << 24)),
                Tuple.Create("f16 negative zero", ElementType.F16, (ushort)0x8000, Bits(0x80000000)),
                Tuple.Create("f16 infinity", ElementType.F16, (ushort)0x7c00, float.PositiveInfinity),
                Tuple.Create("f16 negative infinity", ElementType.F16, (ushort)0xfc00, float.NegativeInfinity),
                Tuple.Create("f16 quiet NaN", ElementType.F16, (ushort)0x7e00, float.NaN),
                Tuple.Create("f16 signaling NaN stays NaN", ElementType.F16, (ushort)0x7c01, float.NaN),
                Tuple.Create("bf16 one", ElementType.BF16, (ushort)0x3f80, 1f),
                Tuple.Create("bf16 max", ElementType.BF16, (ushort)0x7f7f, Bits(0x7f7f0000)),
                Tuple.Create("bf16 smallest subnormal", ElementType.BF16, (ushort)0x0001, Bits(0x00010000)),
                Tuple.Create("bf16 negative infinity", ElementType.BF16, (ushort)0xff80, float.NegativeInfinity),
                Tuple.Create("bf16 NaN", ElementType.BF16, (ushort)0x7fc1, float.NaN),
            };
            foreach (var c in widen)
            {
                float got = c.Item2 == ElementType.F16 ? Float16Bits.ToSingle(c.Item3) : BFloat16Bits.ToSingle(c.Item3);
                Check(SameFloat(got, c.Item4), "ToSingle, " + c.Item1 + ": " + got.ToString("R") + ", expected " + c.Item4.ToString("R"));
            }

            // Array and span helpers.
            float[] values = { 1f, -2f, 65504f, 1e6f };
            ushort[] bits = Float16Bits.FromSingle(values);
            Check(FirstDifference(bits, new ushort[] { 0x3c00, 0xc000, 0x7bff, 0x7c00 }) == null, "Float16Bits.FromSingle(float[])");
            float[] back = new float[4];
            BFloat16Bits.ToSingle(new ReadOnlySpan<ushort>(BFloat16Bits.FromSingle(values)), new Span<float>(back));
            Check(back[0] == 1f && back[1] == -2f && back[2] == 65536f && back[3] == 999424f, "BFloat16Bits span round trip");
            Expect<ArgumentException>("FromSingle with spans of different lengths",
                () => Float16Bits.FromSingle(new ReadOnlySpan<float>(values), new Span<ushort>(new ushort[3])));
            Expect<ArgumentNullException>("ToSingle of a null array", () => BFloat16Bits.ToSingle((ushort[])null));
        }

        // Every pattern: widening gives the value of its fields, narrowing gives the pattern back.
        private static void TestConversionsAllPatterns()
        {
            int bad16 = -1, badBf16 = -1;
            for (int i = 0; i < 1 << 16 && bad16 < 0; i++)
            {
                ushort h = (ushort)i;
                int exp = (h >> 10) & 0x1f, man = h & 0x3ff;
                double want = exp == 0x1f ? (man == 0 ? double.PositiveInfinity : double.NaN)
                    : exp == 0 ? man * Math.Pow(2, -24) : (1024 + man) * Math.Pow(2, exp - 25);
                if ((h & 0x8000) != 0) want = -want;
                float got = Float16Bits.ToSingle(h);
                ushort again = Float16Bits.FromSingle(got);
                bool ok = SameFloat(got, (float)want) && (IsNaN16(h, ElementType.F16)
                    ? IsNaN16(again, ElementType.F16) && (again & 0x8000) == (h & 0x8000) : again == h);
                if (!ok) bad16 = i;
            }
            Check(bad16 < 0, "every float16 pattern widens to its value and narrows back: 0x" + bad16.ToString("x4"));
            for (int i = 0; i < 1 << 16 && badBf16 < 0; i++)
            {
                ushort h = (ushort)i;
                float got = BFloat16Bits.ToSingle(h);
                ushort again = BFloat16Bits.FromSingle(got);
                bool ok = BitsOf(got) == (uint)h << 16 || float.IsNaN(got) && IsNaN16(h, ElementType.BF16);
                ok &= IsNaN16(h, ElementType.BF16) ? IsNaN16(again, ElementType.BF16) && (again & 0x8000) == (h & 0x8000) : again == h;
                if (!ok) badBf16 = i;
            }
            Check(badBf16 < 0, "every bfloat16 pattern widens to its value and narrows back: 0x" + badBf16.ToString("x4"));
        }

        // x rounded to mantBits fraction bits, exponents down to minExp (subnormals below), ties to
        // even, infinity above maxFinite, in double: an independent reference.
        private static double RefRound(float x, int mantBits, int minExp, double maxFinite)
        {
            double ax = Math.Abs((double)x);
            if (ax != 0 && !double.IsInfinity(ax))
            {
                int e = (int)((BitConverter.DoubleToInt64Bits(ax) >> 52) & 0x7ff) - 1023;
                double ulp = BitConverter.Int64BitsToDouble((long)(Math.Max(e, minExp) - mantBits + 1023) << 52);
                ax = Math.Round(ax / ulp, MidpointRounding.ToEven) * ulp;
                if (ax > maxFinite) ax = double.PositiveInfinity;
            }
            return x < 0 || BitsOf(x) == 0x80000000 ? -ax : ax;
        }

        // Narrowing against RefRound around every rounding boundary and on random values.
        private static void TestConversionsReference()
        {
            foreach (ElementType t in new[] { ElementType.F16, ElementType.BF16 })
            {
                bool f16 = t == ElementType.F16;
                int mantBits = f16 ? 10 : 7, minExp = f16 ? -14 : -126;
                ushort maxBits = (ushort)(f16 ? 0x7bff : 0x7f7f);
                Func<float, ushort> narrow = f16 ? (Func<float, ushort>)Float16Bits.FromSingle : BFloat16Bits.FromSingle;
                Func<ushort, float> widen = f16 ? (Func<ushort, float>)Float16Bits.ToSingle : BFloat16Bits.ToSingle;
                double maxFinite = widen(maxBits);
                string first = null;
                int checkedValues = 0;
                Action<float> check = x =>
                {
                    checkedValues++;
                    if (first != null) return;
                    double want = RefRound(x, mantBits, minExp, maxFinite);
                    float got = widen(narrow(x));
                    if ((double)got != want || (BitsOf(got) >> 31) != (BitConverter.DoubleToInt64Bits(want) < 0 ? 1u : 0u))
                    {
                        first = x.ToString("R") + " (0x" + BitsOf(x).ToString("x8") + ") gives " + got.ToString("R") + ", reference " + want.ToString("R");
                    }
                };
                for (int b = 0; b <= maxBits; b++)
                {
                    double lo = widen((ushort)b);
                    double hi = b == maxBits ? lo + (lo - widen((ushort)(b - 1))) : widen((ushort)(b + 1));
                    float mid = (float)((lo + hi) / 2);
                    foreach (float x in new[] { mid, NextDown(mid), NextUp(mid) })
                    {
                        check(x);
                        check(-x);
                    }
                }
                Random r = new Random(42);
                byte[] four = new byte[4];
                for (int i = 0; i < 200000; i++)
                {
                    r.NextBytes(four);
                    float x = BitConverter.ToSingle(four, 0);
                    if (!float.IsNaN(x)) check(x);
                    int e = r.Next(2 * (mantBits - minExp + 20)) - (mantBits - minExp + 10);
                    check((float)((1 + r.NextDouble()) * Math.Pow(2, e)));
                }
                Check(first == null, t + " narrowing equals the reference on " + checkedValues + " values: " + first);
            }
        }

        private struct GemmExCase
        {
            public string Name;
            public int M, N, K;
            public GemmOptions Options;
            public bool Bias;
            public float ScaleW, ScaleA, Skew;
            public bool WantInf16, WantSubnormal16;

            public GemmExCase(string name, int m, int n, int k, GemmOptions options = null, bool bias = true,
                float scaleW = 0.5f, float scaleA = 1f, float skew = 0f, bool wantInf16 = false, bool wantSubnormal16 = false)
            {
                Name = name;
                M = m;
                N = n;
                K = k;
                Options = options;
                Bias = bias;
                ScaleW = scaleW;
                ScaleA = scaleA;
                Skew = skew;
                WantInf16 = wantInf16;
                WantSubnormal16 = wantSubnormal16;
            }
        }

        // The 16-bit overloads on every pair of element types equal the float Gemm on the widened
        // activations, rounded to the output type by Float16Bits / BFloat16Bits, bit for bit.
        private static void TestGemmExMatchesGemm()
        {
            GemmExCase[] cases =
            {
                new GemmExCase("1x1x1", 1, 1, 1, scaleW: 1f),
                new GemmExCase("defaults", 3, 17, 33, scaleA: 3f),
                new GemmExCase("no bias, per-tensor symmetric", 5, 24, 48, bias: false, scaleA: 2f,
                    options: new GemmOptions { ActGranularity = ActGranularity.PerTensor, ActType = ActType.SymmetricI8 }),
                new GemmExCase("relu, skewed, two threads", 9, 40, 130, skew: 1f,
                    options: new GemmOptions { Epilogue = Epilogue.Relu, NumThreads = 2 }),
                new GemmExCase("gelu", 6, 24, 40, scaleW: 1f, scaleA: 2f, options: new GemmOptions { Epilogue = Epilogue.Gelu }),
                new GemmExCase("large outputs overflow f16", 4, 16, 64, bias: false, scaleW: 1f, scaleA: 30000f, wantInf16: true),
                new GemmExCase("tiny outputs are f16 subnormals", 4, 16, 32, bias: false, scaleW: 0.01f, scaleA: 1e-3f,
                    wantSubnormal16: true),
                new GemmExCase("zero rows", 0, 8, 16),
            };
            ElementType[] types = { ElementType.F32, ElementType.F16, ElementType.BF16 };
            int seed = 200, call = 0;
            foreach (GemmExCase c in cases)
            {
                Run(c.Name, () =>
                {
                    Random r = new Random(seed++);
                    using (PackedWeights p = PackedWeights.Pack(RandomArray(r, c.N * c.K, c.ScaleW, 0f), c.N, c.K))
                    {
                        float[] a32 = RandomArray(r, c.M * c.K, c.ScaleA, c.Skew);
                        float[] bias = c.Bias ? RandomArray(r, c.N, 1f, 0f) : null;
                        ReadOnlySpan<float> biasSpan = bias == null ? ReadOnlySpan<float>.Empty : new ReadOnlySpan<float>(bias);
                        foreach (ElementType at in types)
                        {
                            foreach (ElementType yt in types)
                            {
                                if (at == ElementType.F32 && yt == ElementType.F32) continue;
                                string what = c.Name + ", " + at + " -> " + yt;
                                ushort[] a16 = at == ElementType.F32 ? null : Narrow(a32, at);
                                float[] want32 = p.Forward(a16 == null ? a32 : Widen(a16, at), bias, c.Options);
                                bool spans = call++ % 2 == 1; // arrays and spans in turn
                                if (yt == ElementType.F32)
                                {
                                    float[] y = new float[c.M * c.N];
                                    if (!spans) p.Gemm(a16, at, y, bias, c.Options);
                                    else if (bias == null) p.Gemm(new ReadOnlySpan<ushort>(a16), at, new Span<float>(y), c.Options);
                                    else p.Gemm(new ReadOnlySpan<ushort>(a16), at, new Span<float>(y), biasSpan, c.Options);
                                    string diff = FirstDifference(y, want32);
                                    Check(diff == null, what + ": equals Gemm on the widened inputs: " + diff);
                                    continue;
                                }
                                ushort[] y16 = new ushort[c.M * c.N];
                                if (at == ElementType.F32)
                                {
                                    if (!spans) p.Gemm(a32, y16, yt, bias, c.Options);
                                    else if (bias == null) p.Gemm(new ReadOnlySpan<float>(a32), new Span<ushort>(y16), yt, c.Options);
                                    else p.Gemm(new ReadOnlySpan<float>(a32), new Span<ushort>(y16), yt, biasSpan, c.Options);
                                }
                                else if (!spans)
                                {
                                    p.Gemm(a16, at, y16, yt, bias, c.Options);
                                }
                                else if (bias == null)
                                {
                                    p.Gemm(new ReadOnlySpan<ushort>(a16), at, new Span<ushort>(y16), yt, c.Options);
                                }
                                else
                                {
                                    p.Gemm(new ReadOnlySpan<ushort>(a16), at, new Span<ushort>(y16), yt, biasSpan, c.Options);
                                }
                                string diff16 = FirstDifference(y16, Narrow(want32, yt));
                                Check(diff16 == null, what + ": equals Gemm on the widened inputs, rounded: " + diff16);
                                if (at == yt)
                                {
                                    Check(FirstDifference(p.Forward(a16, at, bias, c.Options), y16) == null, what + ": Forward equals Gemm");
                                }
                                if (yt == ElementType.F16 && (c.WantInf16 || c.WantSubnormal16))
                                {
                                    bool inf = Array.Exists(y16, b => (b & 0x7fff) == 0x7c00);
                                    bool sub = Array.Exists(y16, b => (b & 0x7c00) == 0 && (b & 0x3ff) != 0);
                                    Check((!c.WantInf16 || inf) && (!c.WantSubnormal16 || sub),
                                        what + ": outputs include infinities (" + inf + ") or subnormals (" + sub + ") as expected");
                                }
                            }
                        }
                    }
                });
            }
        }

        private static void TestGemmExErrors()
        {
            Random r = new Random(4);
            using (PackedWeights p = PackedWeights.Pack(RandomArray(r, 6 * 4, 1f, 0f), 6, 4)) // N = 6, K = 4
            {
                const ElementType F16 = ElementType.F16, BF16 = ElementType.BF16;
                ushort[] infA = new ushort[8];
                infA[6] = 0x7c00;
                ushort[] nanA = new ushort[8];
                nanA[1] = 0x7fc1;

                // Refused by the library, with its message.
                DynqException de = null;
                ExpectDynq("GemmEx unknown a type", Status.InvalidArgument, "a_type=7 is not a dynq_dtype value",
                    () => p.Gemm(new ushort[8], (ElementType)7, new ushort[12], F16));
                try
                {
                    p.Gemm(new float[8], new ushort[12], (ElementType)9);
                }
                catch (DynqException e)
                {
                    de = e;
                }
                Check(de != null && de.Function == "dynq_gemm_ex" && de.LibraryMessage == "y_type=9 is not a dynq_dtype value",
                    "GemmEx unknown y type: " + (de == null ? "no exception" : de.Function + ": " + de.LibraryMessage));
                // The library gets no buffers for an unknown type, so the lengths do not matter.
                ExpectDynq("GemmEx unknown type, lengths fitting nothing", Status.InvalidArgument, "a_type=3",
                    () => p.Gemm(new ushort[3], (ElementType)3, new float[1]));
                ExpectDynq("GemmEx infinite f16 activation", Status.NonFinite, "A[1][2]",
                    () => p.Gemm(infA, F16, new ushort[12], F16));
                ExpectDynq("GemmEx NaN bf16 activation", Status.NonFinite, "A[0][1]", () => p.Gemm(nanA, BF16, new float[12]));
                ExpectDynq("GemmEx NaN bias", Status.NonFinite, "bias",
                    () => p.Gemm(new ushort[8], F16, new ushort[12], F16, new float[] { 0, 0, float.NaN, 0, 0, 0 }));
                ushort[] shared = new ushort[16];
                ExpectDynq("GemmEx y overlaps a", Status.InvalidArgument, "overlaps",
                    () => p.Gemm(new ReadOnlySpan<ushort>(shared, 0, 8), F16, new Span<ushort>(shared, 4, 12), F16));
                ExpectDynq("GemmEx unknown epilogue", Status.InvalidArgument, "epilogue",
                    () => p.Forward(new ushort[4], F16, null, new GemmOptions { Epilogue = (Epilogue)9 }));
                ushort[] y = new ushort[12];
                for (int i = 0; i < y.Length; i++) y[i] = 0x4700;
                ExpectDynq("GemmEx infinite activation, y kept", Status.NonFinite, "inf", () => p.Gemm(infA, F16, y, F16));
                Check(Array.TrueForAll(y, v => v == 0x4700), "a failing GemmEx leaves y untouched");

                // Checked by the binding.
                ArgumentException ae = Expect<ArgumentException>("GemmEx a not a multiple of K",
                    () => p.Gemm(new ushort[7], F16, new ushort[12], F16));
                Check(ae != null && ae.ParamName == "a" && ae.Message.Contains("multiple of K = 4"), "GemmEx message names a and K");
                ae = Expect<ArgumentException>("GemmEx y of the wrong length", () => p.Gemm(new ushort[8], BF16, new ushort[11], F16));
                Check(ae != null && ae.ParamName == "y", "GemmEx y of the wrong length names y");
                ae = Expect<ArgumentException>("GemmEx float y of the wrong length", () => p.Gemm(new ushort[8], F16, new float[13]));
                Check(ae != null && ae.ParamName == "y", "GemmEx float y of the wrong length names y");
                ae = Expect<ArgumentException>("GemmEx bias of the wrong length",
                    () => p.Gemm(new float[8], new ushort[12], F16, new float[5]));
                Check(ae != null && ae.ParamName == "bias", "GemmEx bias of the wrong length names bias");
                ae = Expect<ArgumentException>("GemmEx 16-bit activations typed F32",
                    () => p.Gemm(new ushort[8], ElementType.F32, new ushort[12], F16));
                Check(ae != null && ae.ParamName == "aType", "F32 for 16-bit activations names aType");
                ae = Expect<ArgumentException>("GemmEx 16-bit outputs typed F32",
                    () => p.Gemm(new float[8], new ushort[12], ElementType.F32));
                Check(ae != null && ae.ParamName == "yType", "F32 for 16-bit outputs names yType");
                Expect<ArgumentException>("Forward on 16-bit data typed F32", () => p.Forward(new ushort[8], ElementType.F32));
                Expect<ArgumentOutOfRangeException>("GemmEx negative threads",
                    () => p.Forward(new ushort[4], F16, null, new GemmOptions { NumThreads = -1 }));
                Expect<ArgumentNullException>("GemmEx null activations", () => p.Gemm((ushort[])null, F16, new ushort[6], F16));
                Expect<ArgumentNullException>("GemmEx null outputs", () => p.Gemm(new ushort[4], F16, (float[])null));
            }

            PackedWeights disposed = PackedWeights.Pack(new float[] { 1, 2, 3, 4 }, 2, 2);
            disposed.Dispose();
            Expect<ObjectDisposedException>("GemmEx after Dispose", () => disposed.Forward(new ushort[] { 0x3c00, 0x3c00 }, ElementType.F16));
        }

        private static int Main()
        {
            Run("version and header", TestVersionAndHeader);
            TestGemmMatchesReference();
            Run("spans", TestSpans);
            Run("gelu", TestGelu);
            Run("pack quantized", TestPackQuantized);
            Run("serialize and load", TestSerializeAndLoad);
            Run("weight qmax", TestWeightQmax);
            Run("errors", TestErrors);
            Run("dispose", TestDispose);
            Run("concurrent gemm", TestConcurrentGemm);
            Run("float16 and bfloat16 known patterns", TestConversionsKnown);
            Run("float16 and bfloat16 all patterns", TestConversionsAllPatterns);
            Run("float16 and bfloat16 rounding reference", TestConversionsReference);
            TestGemmExMatchesGemm();
            Run("gemm ex errors", TestGemmExErrors);
            TestGemmSmoothedMatchesGemm();
            Run("gemm smoothed without factors", TestGemmSmoothedWithoutFactors);
            Run("gemm smoothed errors", TestGemmSmoothedErrors);
            TestGemmResidualMatchesGemmSmoothed();
            Run("gemm residual without residual", TestGemmResidualWithoutResidual);
            Run("gemm residual errors", TestGemmResidualErrors);
            Run("gemm layer norm", TestGemmLayerNorm);
            TestGemmSplitMatchesGemmSmoothed();
            Run("gemm split one output and narrow outputs", TestGemmSplitOneOutputAndNarrowOutputs);
            Run("gemm split errors", TestGemmSplitErrors);
            Run("gemm split heads", TestGemmSplitHeads);
            Console.WriteLine("C# binding of dynq " + DynqLibrary.Version + ", kernel " + DynqLibrary.ActiveIsa + ", runtime "
                + Environment.Version);
            Console.WriteLine("csharp: " + _passed + " passed, " + _failed + " failed");
            return _failed == 0 ? 0 : 1;
        }
    }
}
