// Packed weights: the public face of the binding.
using System;
using System.Runtime.InteropServices;

namespace Dynq
{
    /// <summary>
    /// Quantized, packed weights of a linear layer (an N x K matrix W), ready for Gemm.
    /// Owns native memory: dispose it (using). Safe for concurrent Gemm calls from many threads;
    /// the SafeHandle keeps the native handle alive during each call, even against Dispose.
    /// </summary>
    /// <remarks>
    /// Failures of the library throw <see cref="DynqException"/> with its status and message;
    /// arrays or spans of the wrong length throw <see cref="ArgumentException"/> before any
    /// native call.
    /// </remarks>
    public sealed unsafe class PackedWeights : IDisposable
    {
        private readonly PackedWeightsHandle _handle;

        private PackedWeights(PackedWeightsHandle handle)
        {
            _handle = handle;
            PackedWeightsInfo info = Info;
            N = info.N;
            K = info.K;
        }

        /// <summary>Output channels (rows of W).</summary>
        public int N { get; private set; }

        /// <summary>Inputs per output channel (columns of W).</summary>
        public int K { get; private set; }

        /// <summary>Quantizes float weights to int8 and packs them. <paramref name="w"/> holds
        /// n * k values in <paramref name="layout"/> (NK: n rows of k).</summary>
        /// <exception cref="DynqException">NonFinite for NaN or infinite weights,
        /// InvalidArgument for a zero dimension, Unsupported for k above 65536.</exception>
        public static PackedWeights Pack(ReadOnlySpan<float> w, int n, int k,
            WeightLayout layout = WeightLayout.NK, PackOptions options = null)
        {
            CheckShape("w", w.Length, n, k);
            NativePackConfig cfg = (options ?? new PackOptions()).ToNative();
            PackedWeightsHandle h;
            float empty = 0;
            fixed (float* p = &MemoryMarshal.GetReference(w))
            {
                // An empty input still points somewhere, so the library reports the shape.
                Native.Check(Native.dynq_pack_weights(w.Length == 0 ? &empty : p, (UIntPtr)n, (UIntPtr)k,
                    (uint)layout, &cfg, out h), "dynq_pack_weights");
            }
            return new PackedWeights(h);
        }

        /// <summary>Array overload of <see cref="Pack(ReadOnlySpan{float}, int, int, WeightLayout, PackOptions)"/>.</summary>
        public static PackedWeights Pack(float[] w, int n, int k, WeightLayout layout = WeightLayout.NK,
            PackOptions options = null)
        {
            if (w == null) throw new ArgumentNullException("w");
            return Pack(new ReadOnlySpan<float>(w), n, k, layout, options);
        }

        /// <summary>Packs weights quantized elsewhere: n * k int8 values in <paramref name="layout"/>
        /// and 1 (per tensor) or n (per channel) scales, W[j][i] ~= scale[j] * q[j][i].</summary>
        public static PackedWeights PackQuantized(ReadOnlySpan<sbyte> q, int n, int k, ReadOnlySpan<float> scales,
            WeightLayout layout = WeightLayout.NK, PackOptions options = null)
        {
            CheckShape("q", q.Length, n, k);
            NativePackConfig cfg = (options ?? new PackOptions()).ToNative();
            PackedWeightsHandle h;
            sbyte emptyQ = 0;
            float emptyS = 0;
            fixed (sbyte* qp = &MemoryMarshal.GetReference(q))
            fixed (float* sp = &MemoryMarshal.GetReference(scales))
            {
                Native.Check(Native.dynq_pack_quantized_weights(q.Length == 0 ? &emptyQ : qp, (UIntPtr)n,
                    (UIntPtr)k, (uint)layout, scales.Length == 0 ? &emptyS : sp, (UIntPtr)scales.Length, &cfg,
                    out h), "dynq_pack_quantized_weights");
            }
            return new PackedWeights(h);
        }

        /// <summary>Array overload of PackQuantized.</summary>
        public static PackedWeights PackQuantized(sbyte[] q, int n, int k, float[] scales,
            WeightLayout layout = WeightLayout.NK, PackOptions options = null)
        {
            if (q == null) throw new ArgumentNullException("q");
            if (scales == null) throw new ArgumentNullException("scales");
            return PackQuantized(new ReadOnlySpan<sbyte>(q), n, k, new ReadOnlySpan<float>(scales), layout, options);
        }

        /// <summary>Loads a blob written by <see cref="Serialize"/> (on any machine) and packs it
        /// for this CPU (or options.Isa).</summary>
        /// <exception cref="DynqException">CorruptData for a truncated, altered or foreign blob,
        /// Unsupported for a newer format version.</exception>
        public static PackedWeights Load(ReadOnlySpan<byte> blob, PackOptions options = null)
        {
            NativePackConfig cfg = (options ?? new PackOptions()).ToNative();
            PackedWeightsHandle h;
            byte empty = 0;
            fixed (byte* p = &MemoryMarshal.GetReference(blob))
            {
                Native.Check(Native.dynq_packed_weights_deserialize(blob.Length == 0 ? &empty : p,
                    (UIntPtr)blob.Length, &cfg, out h), "dynq_packed_weights_deserialize");
            }
            return new PackedWeights(h);
        }

        /// <summary>Array overload of Load.</summary>
        public static PackedWeights Load(byte[] blob, PackOptions options = null)
        {
            if (blob == null) throw new ArgumentNullException("blob");
            return Load(new ReadOnlySpan<byte>(blob), options);
        }

        /// <summary>A portable, checksummed blob of the quantized weights that
        /// <see cref="Load(byte[], PackOptions)"/> reads on any CPU.</summary>
        public byte[] Serialize()
        {
            UIntPtr size;
            Native.Check(Native.dynq_packed_weights_serialize(_handle, null, UIntPtr.Zero, &size),
                "dynq_packed_weights_serialize");
            byte[] blob = new byte[checked((int)(ulong)size)];
            UIntPtr written;
            fixed (byte* p = blob)
            {
                Native.Check(Native.dynq_packed_weights_serialize(_handle, p, size, &written),
                    "dynq_packed_weights_serialize");
            }
            return blob;
        }

        /// <summary>What the library reports about these weights.</summary>
        public PackedWeightsInfo Info
        {
            get
            {
                NativeInfo ni = default(NativeInfo);
                ni.StructSize = (uint)sizeof(NativeInfo);
                Native.Check(Native.dynq_packed_weights_get_info(_handle, &ni), "dynq_packed_weights_get_info");
                PackedWeightsInfo info = new PackedWeightsInfo();
                info.N = checked((int)(ulong)ni.N);
                info.K = checked((int)(ulong)ni.K);
                info.Granularity = (WeightGranularity)ni.Granularity;
                info.Isa = (Isa)ni.Isa;
                info.KernelName = Native.String(ni.KernelName);
                info.LayoutVersion = (int)ni.LayoutVersion;
                info.Bytes = (long)(ulong)ni.Bytes;
                info.SerializedBytes = (long)(ulong)ni.SerializedBytes;
                info.MR = (int)ni.Mr;
                info.NR = (int)ni.Nr;
                info.KR = (int)ni.Kr;
                return info;
            }
        }

        /// <summary>
        /// y = dequant(quant(a) x W^T) + bias, then the epilogue, with the activations quantized
        /// from the range seen in this call. <paramref name="a"/> holds m rows of K values
        /// (m = a.Length / K, zero allowed); <paramref name="y"/> receives exactly m * N values;
        /// <paramref name="bias"/> is empty or N values.
        /// </summary>
        /// <exception cref="ArgumentException">A length does not fit the shape.</exception>
        /// <exception cref="DynqException">NonFinite for NaN or infinity in a or bias (the
        /// message names the element; y is left untouched), InvalidArgument for bad options.</exception>
        public void Gemm(ReadOnlySpan<float> a, Span<float> y, ReadOnlySpan<float> bias, GemmOptions options = null)
        {
            int n = N, k = K;
            if (a.Length % k != 0)
            {
                throw new ArgumentException(string.Format("a has {0} values, not a multiple of K = {1}", a.Length, k), "a");
            }
            int m = a.Length / k;
            if ((long)y.Length != (long)m * n)
            {
                throw new ArgumentException(string.Format("y has {0} values, expected m * N = {1} * {2} = {3}",
                    y.Length, m, n, (long)m * n), "y");
            }
            if (bias.Length != 0 && bias.Length != n)
            {
                throw new ArgumentException(string.Format("bias has {0} values, expected 0 or N = {1}", bias.Length, n), "bias");
            }
            NativeGemmConfig cfg = (options ?? new GemmOptions()).ToNative();
            fixed (float* ap = &MemoryMarshal.GetReference(a))
            fixed (float* yp = &MemoryMarshal.GetReference(y))
            fixed (float* bp = &MemoryMarshal.GetReference(bias))
            {
                Native.Check(Native.dynq_gemm(_handle, m == 0 ? null : ap, (UIntPtr)m, (UIntPtr)k,
                    bias.Length == 0 ? null : bp, m == 0 ? null : yp, (UIntPtr)n, &cfg), "dynq_gemm");
            }
        }

        /// <summary>Gemm without bias.</summary>
        public void Gemm(ReadOnlySpan<float> a, Span<float> y, GemmOptions options = null)
        {
            Gemm(a, y, ReadOnlySpan<float>.Empty, options);
        }

        /// <summary>Array overload: writes y (m * N values); bias may be null.</summary>
        public void Gemm(float[] a, float[] y, float[] bias = null, GemmOptions options = null)
        {
            if (a == null) throw new ArgumentNullException("a");
            if (y == null) throw new ArgumentNullException("y");
            Gemm(new ReadOnlySpan<float>(a), new Span<float>(y),
                bias == null ? ReadOnlySpan<float>.Empty : new ReadOnlySpan<float>(bias), options);
        }

        /// <summary>Gemm into a new array: returns y (m * N values) for a (m * K values); bias may be null.</summary>
        public float[] Forward(float[] a, float[] bias = null, GemmOptions options = null)
        {
            if (a == null) throw new ArgumentNullException("a");
            int k = K;
            float[] y = new float[a.Length % k == 0 ? checked(a.Length / k * N) : 0];
            Gemm(a, y, bias, options);
            return y;
        }

        /// <summary>Releases the native memory. Calls after Dispose throw ObjectDisposedException.</summary>
        public void Dispose()
        {
            _handle.Dispose();
        }

        /// <summary>Whether Dispose has been called.</summary>
        public bool IsDisposed { get { return _handle.IsClosed; } }

        private static void CheckShape(string name, int length, int n, int k)
        {
            if (n < 0 || k < 0)
            {
                throw new ArgumentOutOfRangeException(n < 0 ? "n" : "k", string.Format("negative shape n={0} x k={1}", n, k));
            }
            if ((long)length != (long)n * k)
            {
                throw new ArgumentException(string.Format("{0} has {1} values, expected n * k = {2} * {3} = {4}",
                    name, length, n, k, (long)n * k), name);
            }
        }
    }
}
