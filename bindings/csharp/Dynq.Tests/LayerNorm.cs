// Tests of GemmLayerNorm (dynq_gemm_layer_norm): bit for bit GemmResidual followed by a C#
// re-implementation of the layer norm's definition on each row (floats, every step rounded by an
// explicit cast), with float and float16 data, with and without residual and bias; lengths refused
// by the binding, bad values by the library, y untouched.
using System;

namespace Dynq.Tests
{
    internal static partial class Program
    {
        private static float LnTree(float[] s)
        {
            for (int w = 32; w > 0; w /= 2)
            {
                for (int l = 0; l < w; l++) s[l] = (float)(s[l] + s[l + w]);
            }
            return s[0];
        }

        // dynq's layer norm definition on row `row` of x (n values).
        private static void LayerNormRef(float[] x, int row, int n, float[] scale, float[] bias, float eps)
        {
            int o = row * n;
            float[] s = new float[64];
            for (int j = 0; j < n; j++) s[j % 64] = (float)(s[j % 64] + x[o + j]);
            float m0 = (float)(LnTree(s) / (float)n);
            s = new float[64];
            for (int j = 0; j < n; j++) s[j % 64] = (float)(s[j % 64] + (float)(x[o + j] - m0));
            float mean = (float)(m0 + (float)(LnTree(s) / (float)n));
            s = new float[64];
            for (int j = 0; j < n; j++)
            {
                float d = (float)(x[o + j] - mean);
                s[j % 64] = (float)(s[j % 64] + (float)(d * d));
            }
            float v = (float)(LnTree(s) / (float)n);
            float inv = (float)(1.0f / (float)Math.Sqrt((float)(v + eps)));
            for (int j = 0; j < n; j++)
            {
                float t = (float)((float)(x[o + j] - mean) * inv);
                t = (float)(t * scale[j]);
                x[o + j] = bias == null ? t : (float)(t + bias[j]);
            }
        }

        private static void TestGemmLayerNorm()
        {
            Random r = new Random(91);
            const int m = 21, n = 150, k = 40;
            PackedWeights p = PackedWeights.Pack(RandomArray(r, n * k, 0.5f, 0), n, k);
            float[] a = RandomArray(r, m * k, 1, 0);
            float[] res = RandomArray(r, m * n, 3, 0);
            float[] bias = RandomArray(r, n, 1, 0);
            float[] scale = RandomArray(r, n, 0.5f, 1);
            float[] lnb = RandomArray(r, n, 1, 0);
            GemmOptions opts = new GemmOptions { Epilogue = Epilogue.Gelu, NumThreads = 2 };
            foreach (bool withRes in new[] { true, false })
            {
                foreach (bool withBias in new[] { true, false })
                {
                    float[] lb = withBias ? lnb : null;
                    ReadOnlySpan<float> rs = withRes ? new ReadOnlySpan<float>(res) : ReadOnlySpan<float>.Empty;
                    float[] want = new float[m * n];
                    p.GemmResidual(new ReadOnlySpan<float>(a), ReadOnlySpan<float>.Empty, rs, new Span<float>(want), new ReadOnlySpan<float>(bias), opts);
                    for (int i = 0; i < m; i++) LayerNormRef(want, i, n, scale, lb, 1e-5f);
                    float[] y = new float[m * n];
                    p.GemmLayerNorm(new ReadOnlySpan<float>(a), rs, new ReadOnlySpan<float>(scale),
                        lb == null ? ReadOnlySpan<float>.Empty : new ReadOnlySpan<float>(lb), 1e-5f, new Span<float>(y),
                        ReadOnlySpan<float>.Empty, new ReadOnlySpan<float>(bias), opts);
                    string diff = FirstDifference(y, want);
                    Check(diff == null, "GemmLayerNorm (float, residual " + withRes + ", bias " + withBias + ") equals its definition: " + diff);
                }
            }
            // float16: the stored sums, widened, normalized, rounded.
            ushort[] a16 = Float16Bits.FromSingle(a), r16 = Float16Bits.FromSingle(res);
            ushort[] base16 = new ushort[m * n], y16 = new ushort[m * n];
            p.GemmResidual(new ReadOnlySpan<ushort>(a16), ElementType.F16, ReadOnlySpan<float>.Empty, new ReadOnlySpan<ushort>(r16),
                new Span<ushort>(base16), ElementType.F16, new ReadOnlySpan<float>(bias), opts);
            float[] w16 = Float16Bits.ToSingle(base16);
            for (int i = 0; i < m; i++) LayerNormRef(w16, i, n, scale, lnb, 1e-5f);
            p.GemmLayerNorm(new ReadOnlySpan<ushort>(a16), ElementType.F16, new ReadOnlySpan<ushort>(r16), new ReadOnlySpan<float>(scale),
                new ReadOnlySpan<float>(lnb), 1e-5f, new Span<ushort>(y16), ElementType.F16, ReadOnlySpan<float>.Empty,
                new ReadOnlySpan<float>(bias), opts);
            ushort[] want16 = Float16Bits.FromSingle(w16);
            bool same = true;
            for (int i = 0; i < want16.Length; i++) same &= want16[i] == y16[i];
            Check(same, "GemmLayerNorm (float16) equals its definition on the rounded sums");
            // Refusals, y untouched.
            float[] yy = new float[m * n];
            for (int i = 0; i < yy.Length; i++) yy[i] = 7;
            Expect<ArgumentException>("GemmLayerNorm with a short lnScale", () => p.GemmLayerNorm(new ReadOnlySpan<float>(a),
                ReadOnlySpan<float>.Empty, new ReadOnlySpan<float>(scale, 0, n - 1), ReadOnlySpan<float>.Empty, 1e-5f,
                new Span<float>(yy), ReadOnlySpan<float>.Empty, ReadOnlySpan<float>.Empty));
            float[] bad = (float[])scale.Clone();
            bad[4] = float.NaN;
            ExpectDynq("GemmLayerNorm with NaN in lnScale", Status.NonFinite, "gamma[4]", () => p.GemmLayerNorm(
                new ReadOnlySpan<float>(a), ReadOnlySpan<float>.Empty, new ReadOnlySpan<float>(bad), ReadOnlySpan<float>.Empty,
                1e-5f, new Span<float>(yy), ReadOnlySpan<float>.Empty, ReadOnlySpan<float>.Empty));
            ExpectDynq("GemmLayerNorm with a negative epsilon", Status.InvalidArgument, "epsilon", () => p.GemmLayerNorm(
                new ReadOnlySpan<float>(a), ReadOnlySpan<float>.Empty, new ReadOnlySpan<float>(scale), ReadOnlySpan<float>.Empty,
                -1f, new Span<float>(yy), ReadOnlySpan<float>.Empty, ReadOnlySpan<float>.Empty));
            bool untouched = true;
            foreach (float v in yy) untouched &= v == 7;
            Check(untouched, "GemmLayerNorm leaves y untouched on errors");
            p.Dispose();
        }
    }
}
