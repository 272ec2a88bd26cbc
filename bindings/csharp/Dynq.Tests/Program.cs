// Tests of the C# binding: packing, GEMM against the reference bit for bit in every
// configuration, array and span overloads, serialization, every error path (as DynqException
// with the library's status and message, or ArgumentException for lengths checked in C#),
// disposal and concurrent use. A console program: prints "N passed, N failed", exit code 1 on
// any failure. DYNQ_HEADER=<path of dynq.h>, when set, is checked against the enums here.
using System;
using System.Collections.Generic;
using System.IO;
using System.Text.RegularExpressions;
using System.Threading;

namespace Dynq.Tests
{
    internal static class Program
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

        // GELU uses dynq's own erf approximation: compared with an erf of double precision
        // within a tolerance, applied to the output without epilogue.
        private static void TestGelu()
        {
            Random r = new Random(5);
            int n = 24, k = 40, m = 6;
            using (PackedWeights p = PackedWeights.Pack(RandomArray(r, n * k, 1f, 0f), n, k))
            {
                float[] a = RandomArray(r, m * k, 2f, 0f);
                float[] bias = RandomArray(r, n, 1f, 0f);
                float[] plain = p.Forward(a, bias);
                float[] gelu = p.Forward(a, bias, new GemmOptions { Epilogue = Epilogue.Gelu });
                int bad = -1;
                for (int i = 0; i < plain.Length && bad < 0; i++)
                {
                    double want = 0.5 * plain[i] * (1 + Erf(plain[i] / Math.Sqrt(2)));
                    if (Math.Abs(gelu[i] - want) > 2e-6 * (1 + Math.Abs(want))) bad = i;
                }
                Check(bad < 0, "GELU epilogue matches 0.5 y (1 + erf(y / sqrt 2))" +
                    (bad < 0 ? "" : ": element " + bad + " GELU(" + plain[bad] + ") = " + gelu[bad]));
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

        private static int Main()
        {
            Run("version and header", TestVersionAndHeader);
            TestGemmMatchesReference();
            Run("spans", TestSpans);
            Run("gelu", TestGelu);
            Run("pack quantized", TestPackQuantized);
            Run("serialize and load", TestSerializeAndLoad);
            Run("errors", TestErrors);
            Run("dispose", TestDispose);
            Run("concurrent gemm", TestConcurrentGemm);
            Console.WriteLine("C# binding of dynq " + DynqLibrary.Version + ", kernel " + DynqLibrary.ActiveIsa + ", runtime "
                + Environment.Version);
            Console.WriteLine("csharp: " + _passed + " passed, " + _failed + " failed");
            return _failed == 0 ? 0 : 1;
        }
    }
}
