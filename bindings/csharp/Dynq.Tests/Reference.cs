// A reference of the documented semantics (README "What is computed") in plain C#, mirroring
// tests/c/test_abi.c. Every float operation is rounded to float on its own with an explicit
// cast, so the results must equal the library's bit for bit (a double intermediate of one
// +, -, *, / of floats rounds to the same float).
using System;

namespace Dynq.Tests
{
    internal static class Reference
    {
        private const float TinyScale = 1e-45f;

        private struct QParams
        {
            public float Scale;
            public int Zp;
        }

        // Round half to even and convert, saturating (C nearbyintf + cast).
        private static int RoundI32(float x)
        {
            double r = Math.Round((double)x, MidpointRounding.ToEven);
            if (r >= 2147483648.0) return int.MaxValue;
            if (r < -2147483648.0) return int.MinValue;
            return (int)r;
        }

        private static int Clamp(long v, int lo, int hi)
        {
            return (int)(v < lo ? lo : v > hi ? hi : v);
        }

        private static QParams AsymParams(float lo, float hi)
        {
            QParams p = new QParams();
            float range = (float)(hi - lo);
            if (range == 0f) return p;
            p.Scale = range <= float.MaxValue ? (float)(range / 255f) : (float)((float)(hi / 255f) - (float)(lo / 255f));
            if (p.Scale == 0f) p.Scale = TinyScale;
            p.Zp = Clamp(RoundI32((float)(-lo / p.Scale)), 0, 255);
            return p;
        }

        private static float SymmetricScale(float amax)
        {
            if (amax == 0f) return 0f;
            float s = (float)(amax / 127f);
            return s == 0f ? TinyScale : s;
        }

        private static QParams SymParams(float lo, float hi)
        {
            QParams p = new QParams();
            p.Scale = SymmetricScale(hi > -lo ? hi : -lo);
            p.Zp = 128;
            return p;
        }

        private static int QuantizeAct(float x, QParams p, ActType type)
        {
            if (p.Scale == 0f) return p.Zp;
            int r = RoundI32((float)(x / p.Scale));
            if (type == ActType.AsymmetricU8) return Clamp((long)r + p.Zp, 0, 255);
            return Clamp(r, -127, 127) + 128;
        }

        /// <summary>w is [n][k]; q gets [n][k], scales n (or 1 per tensor).</summary>
        public static void QuantizeWeights(float[] w, int n, int k, bool perTensor, out sbyte[] q, out float[] scales)
        {
            q = new sbyte[n * k];
            scales = new float[perTensor ? 1 : n];
            float tmax = 0f;
            for (int j = 0; j < n; j++)
            {
                float amax = 0f;
                for (int i = 0; i < k; i++) amax = Math.Max(amax, Math.Abs(w[j * k + i]));
                tmax = Math.Max(tmax, amax);
                if (!perTensor) scales[j] = SymmetricScale(amax);
            }
            if (perTensor) scales[0] = SymmetricScale(tmax);
            for (int j = 0; j < n; j++)
            {
                float s = perTensor ? scales[0] : scales[j];
                for (int i = 0; i < k; i++)
                {
                    q[j * k + i] = s == 0f ? (sbyte)0 : (sbyte)Clamp(RoundI32((float)(w[j * k + i] / s)), -127, 127);
                }
            }
        }

        /// <summary>a is [m][k]; q is [n][k] with 1 or n scales; bias null or n values.</summary>
        public static float[] Gemm(float[] a, int m, int k, sbyte[] q, float[] sw, int n, float[] bias, GemmOptions o)
        {
            o = o ?? new GemmOptions();
            float[] lo = new float[m], hi = new float[m];
            float glo = 0f, ghi = 0f;
            for (int i = 0; i < m; i++)
            {
                for (int kk = 0; kk < k; kk++)
                {
                    float x = a[i * k + kk];
                    if (x < lo[i]) lo[i] = x;
                    if (x > hi[i]) hi[i] = x;
                }
                if (lo[i] < glo) glo = lo[i];
                if (hi[i] > ghi) ghi = hi[i];
            }
            long[] colsum = new long[n];
            for (int j = 0; j < n; j++)
                for (int kk = 0; kk < k; kk++) colsum[j] += q[j * k + kk];
            float[] y = new float[m * n];
            int[] qa = new int[k];
            for (int i = 0; i < m; i++)
            {
                bool perTensor = o.ActGranularity == ActGranularity.PerTensor;
                float l = perTensor ? glo : lo[i], h = perTensor ? ghi : hi[i];
                QParams p = o.ActType == ActType.AsymmetricU8 ? AsymParams(l, h) : SymParams(l, h);
                for (int kk = 0; kk < k; kk++) qa[kk] = QuantizeAct(a[i * k + kk], p, o.ActType);
                for (int j = 0; j < n; j++)
                {
                    long acc = 0;
                    for (int kk = 0; kk < k; kk++) acc += (long)qa[kk] * q[j * k + kk];
                    long c = acc - (long)p.Zp * colsum[j];
                    if (c > int.MaxValue || c < int.MinValue) throw new InvalidOperationException("reference: int32 overflow");
                    float s = (float)(p.Scale * sw[sw.Length == 1 ? 0 : j]);
                    float t = (float)((float)(int)c * s);
                    if (bias != null) t = (float)(t + bias[j]);
                    if (o.Epilogue == Epilogue.Relu) t = t > 0f ? t : 0f;
                    y[i * n + j] = t;
                }
            }
            return y;
        }
    }
}
