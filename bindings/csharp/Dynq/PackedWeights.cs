// Packed weights: the public face of the binding.
using System;
using System.Buffers;
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
            int m = CheckGemmShape(a.Length, y.Length, bias.Length);
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

        /// <summary>
        /// Gemm on float16 or bfloat16 activations (<paramref name="aType"/>, as ushort bit
        /// patterns) giving float16 or bfloat16 outputs (<paramref name="yType"/>); the bias
        /// stays float. The inputs are widened to float exactly and the float result is rounded
        /// to nearest even (as <see cref="Float16Bits.FromSingle(float)"/> and
        /// <see cref="BFloat16Bits.FromSingle(float)"/> do), so y equals the float Gemm on the
        /// widened inputs, rounded, bit for bit. Lengths as for the float Gemm, in elements.
        /// </summary>
        /// <exception cref="ArgumentException">A length does not fit the shape, or a type of
        /// 16-bit data is F32.</exception>
        /// <exception cref="DynqException">InvalidArgument for a type that is no
        /// <see cref="ElementType"/> (with the library's message) or bad options, NonFinite for
        /// NaN or infinity in a or bias (y is left untouched).</exception>
        public void Gemm(ReadOnlySpan<ushort> a, ElementType aType, Span<ushort> y, ElementType yType,
            ReadOnlySpan<float> bias, GemmOptions options = null)
        {
            fixed (ushort* ap = &MemoryMarshal.GetReference(a))
            fixed (ushort* yp = &MemoryMarshal.GetReference(y))
            {
                GemmEx(ap, a.Length, aType, true, yp, y.Length, yType, true, ReadOnlySpan<float>.Empty, null, 0,
                    NativeFunction.GemmEx, bias, options);
            }
        }

        /// <summary>Gemm on 16-bit activations and outputs, without bias.</summary>
        public void Gemm(ReadOnlySpan<ushort> a, ElementType aType, Span<ushort> y, ElementType yType,
            GemmOptions options = null)
        {
            Gemm(a, aType, y, yType, ReadOnlySpan<float>.Empty, options);
        }

        /// <summary>Gemm on float16 or bfloat16 activations (<paramref name="aType"/>, as ushort
        /// bit patterns) giving float outputs; otherwise as the 16-bit overload.</summary>
        public void Gemm(ReadOnlySpan<ushort> a, ElementType aType, Span<float> y, ReadOnlySpan<float> bias,
            GemmOptions options = null)
        {
            fixed (ushort* ap = &MemoryMarshal.GetReference(a))
            fixed (float* yp = &MemoryMarshal.GetReference(y))
            {
                GemmEx(ap, a.Length, aType, true, yp, y.Length, ElementType.F32, false,
                    ReadOnlySpan<float>.Empty, null, 0, NativeFunction.GemmEx, bias, options);
            }
        }

        /// <summary>Gemm on 16-bit activations giving float outputs, without bias.</summary>
        public void Gemm(ReadOnlySpan<ushort> a, ElementType aType, Span<float> y, GemmOptions options = null)
        {
            Gemm(a, aType, y, ReadOnlySpan<float>.Empty, options);
        }

        /// <summary>Gemm on float activations giving float16 or bfloat16 outputs
        /// (<paramref name="yType"/>, as ushort bit patterns); otherwise as the 16-bit overload.</summary>
        public void Gemm(ReadOnlySpan<float> a, Span<ushort> y, ElementType yType, ReadOnlySpan<float> bias,
            GemmOptions options = null)
        {
            fixed (float* ap = &MemoryMarshal.GetReference(a))
            fixed (ushort* yp = &MemoryMarshal.GetReference(y))
            {
                GemmEx(ap, a.Length, ElementType.F32, false, yp, y.Length, yType, true,
                    ReadOnlySpan<float>.Empty, null, 0, NativeFunction.GemmEx, bias, options);
            }
        }

        /// <summary>Gemm on float activations giving 16-bit outputs, without bias.</summary>
        public void Gemm(ReadOnlySpan<float> a, Span<ushort> y, ElementType yType, GemmOptions options = null)
        {
            Gemm(a, y, yType, ReadOnlySpan<float>.Empty, options);
        }

        /// <summary>Array overload of Gemm on 16-bit activations and outputs; bias may be null.</summary>
        public void Gemm(ushort[] a, ElementType aType, ushort[] y, ElementType yType, float[] bias = null,
            GemmOptions options = null)
        {
            if (a == null) throw new ArgumentNullException("a");
            if (y == null) throw new ArgumentNullException("y");
            Gemm(new ReadOnlySpan<ushort>(a), aType, new Span<ushort>(y), yType,
                bias == null ? ReadOnlySpan<float>.Empty : new ReadOnlySpan<float>(bias), options);
        }

        /// <summary>Array overload of Gemm on 16-bit activations giving float outputs; bias may be null.</summary>
        public void Gemm(ushort[] a, ElementType aType, float[] y, float[] bias = null, GemmOptions options = null)
        {
            if (a == null) throw new ArgumentNullException("a");
            if (y == null) throw new ArgumentNullException("y");
            Gemm(new ReadOnlySpan<ushort>(a), aType, new Span<float>(y),
                bias == null ? ReadOnlySpan<float>.Empty : new ReadOnlySpan<float>(bias), options);
        }

        /// <summary>Array overload of Gemm on float activations giving 16-bit outputs; bias may be null.</summary>
        public void Gemm(float[] a, ushort[] y, ElementType yType, float[] bias = null, GemmOptions options = null)
        {
            if (a == null) throw new ArgumentNullException("a");
            if (y == null) throw new ArgumentNullException("y");
            Gemm(new ReadOnlySpan<float>(a), new Span<ushort>(y), yType,
                bias == null ? ReadOnlySpan<float>.Empty : new ReadOnlySpan<float>(bias), options);
        }

        /// <summary>Gemm into a new array on 16-bit data: returns y (m * N values) for a (m * K
        /// values), both of <paramref name="type"/> (F16 or BF16); bias may be null.</summary>
        public ushort[] Forward(ushort[] a, ElementType type, float[] bias = null, GemmOptions options = null)
        {
            if (a == null) throw new ArgumentNullException("a");
            int k = K;
            ushort[] y = new ushort[a.Length % k == 0 ? checked(a.Length / k * N) : 0];
            Gemm(a, type, y, type, bias, options);
            return y;
        }

        /// <summary>
        /// Gemm with per-input-channel smoothing factors (SmoothQuant, dynq_gemm_smoothed): row i
        /// of <paramref name="a"/> is quantized as a[i][j] * smooth[j], one float multiplication,
        /// so y equals the float Gemm on a multiplied by <paramref name="smooth"/>, bit for bit.
        /// Quantize the weights with column j of W[N][K] (row j of W[K][N]) divided by smooth[j]:
        /// the product is the same, but channels of a with very different ranges share one
        /// quantization range better. <paramref name="smooth"/> is empty (then this is Gemm) or
        /// K positive finite values; lengths otherwise as for Gemm.
        /// </summary>
        /// <exception cref="ArgumentException">A length does not fit the shape: smooth has
        /// neither 0 nor K values (ParamName "smooth"), or a, y or bias.</exception>
        /// <exception cref="DynqException">InvalidArgument for a factor that is zero, negative,
        /// NaN or infinite ("smoothing factor [j] is 0; smoothing factors must be positive and
        /// finite"), for y overlapping smooth, or bad options; NonFinite for NaN or infinity in a
        /// or bias, or a product that overflows. y is then left untouched.</exception>
        public void GemmSmoothed(ReadOnlySpan<float> a, ReadOnlySpan<float> smooth, Span<float> y,
            ReadOnlySpan<float> bias, GemmOptions options = null)
        {
            fixed (float* ap = &MemoryMarshal.GetReference(a))
            fixed (float* yp = &MemoryMarshal.GetReference(y))
            {
                GemmEx(ap, a.Length, ElementType.F32, false, yp, y.Length, ElementType.F32, false, smooth, null, 0,
                    NativeFunction.GemmSmoothed, bias, options);
            }
        }

        /// <summary>GemmSmoothed on float data, without bias.</summary>
        public void GemmSmoothed(ReadOnlySpan<float> a, ReadOnlySpan<float> smooth, Span<float> y,
            GemmOptions options = null)
        {
            GemmSmoothed(a, smooth, y, ReadOnlySpan<float>.Empty, options);
        }

        /// <summary>GemmSmoothed on float16 or bfloat16 activations (<paramref name="aType"/>, as
        /// ushort bit patterns) giving float16 or bfloat16 outputs (<paramref name="yType"/>): the
        /// activations are widened to float exactly, then multiplied by the factors; the result is
        /// rounded as by the 16-bit Gemm overloads. F32 for 16-bit data throws ArgumentException.</summary>
        public void GemmSmoothed(ReadOnlySpan<ushort> a, ElementType aType, ReadOnlySpan<float> smooth, Span<ushort> y,
            ElementType yType, ReadOnlySpan<float> bias, GemmOptions options = null)
        {
            fixed (ushort* ap = &MemoryMarshal.GetReference(a))
            fixed (ushort* yp = &MemoryMarshal.GetReference(y))
            {
                GemmEx(ap, a.Length, aType, true, yp, y.Length, yType, true, smooth, null, 0, NativeFunction.GemmSmoothed, bias,
                    options);
            }
        }

        /// <summary>GemmSmoothed on 16-bit activations and outputs, without bias.</summary>
        public void GemmSmoothed(ReadOnlySpan<ushort> a, ElementType aType, ReadOnlySpan<float> smooth, Span<ushort> y,
            ElementType yType, GemmOptions options = null)
        {
            GemmSmoothed(a, aType, smooth, y, yType, ReadOnlySpan<float>.Empty, options);
        }

        /// <summary>GemmSmoothed on 16-bit activations (<paramref name="aType"/>) giving float outputs.</summary>
        public void GemmSmoothed(ReadOnlySpan<ushort> a, ElementType aType, ReadOnlySpan<float> smooth, Span<float> y,
            ReadOnlySpan<float> bias, GemmOptions options = null)
        {
            fixed (ushort* ap = &MemoryMarshal.GetReference(a))
            fixed (float* yp = &MemoryMarshal.GetReference(y))
            {
                GemmEx(ap, a.Length, aType, true, yp, y.Length, ElementType.F32, false, smooth, null, 0,
                    NativeFunction.GemmSmoothed, bias, options);
            }
        }

        /// <summary>GemmSmoothed on 16-bit activations giving float outputs, without bias.</summary>
        public void GemmSmoothed(ReadOnlySpan<ushort> a, ElementType aType, ReadOnlySpan<float> smooth, Span<float> y,
            GemmOptions options = null)
        {
            GemmSmoothed(a, aType, smooth, y, ReadOnlySpan<float>.Empty, options);
        }

        /// <summary>GemmSmoothed on float activations giving 16-bit outputs (<paramref name="yType"/>).</summary>
        public void GemmSmoothed(ReadOnlySpan<float> a, ReadOnlySpan<float> smooth, Span<ushort> y, ElementType yType,
            ReadOnlySpan<float> bias, GemmOptions options = null)
        {
            fixed (float* ap = &MemoryMarshal.GetReference(a))
            fixed (ushort* yp = &MemoryMarshal.GetReference(y))
            {
                GemmEx(ap, a.Length, ElementType.F32, false, yp, y.Length, yType, true, smooth, null, 0,
                    NativeFunction.GemmSmoothed, bias, options);
            }
        }

        /// <summary>GemmSmoothed on float activations giving 16-bit outputs, without bias.</summary>
        public void GemmSmoothed(ReadOnlySpan<float> a, ReadOnlySpan<float> smooth, Span<ushort> y, ElementType yType,
            GemmOptions options = null)
        {
            GemmSmoothed(a, smooth, y, yType, ReadOnlySpan<float>.Empty, options);
        }

        /// <summary>Array overload of GemmSmoothed on float data: writes y (m * N values);
        /// smooth (then this is Gemm) and bias may be null.</summary>
        public void GemmSmoothed(float[] a, float[] smooth, float[] y, float[] bias = null, GemmOptions options = null)
        {
            if (a == null) throw new ArgumentNullException("a");
            if (y == null) throw new ArgumentNullException("y");
            GemmSmoothed(new ReadOnlySpan<float>(a), AsSpan(smooth), new Span<float>(y), AsSpan(bias), options);
        }

        /// <summary>Array overload of GemmSmoothed on 16-bit activations and outputs; smooth and bias may be null.</summary>
        public void GemmSmoothed(ushort[] a, ElementType aType, float[] smooth, ushort[] y, ElementType yType,
            float[] bias = null, GemmOptions options = null)
        {
            if (a == null) throw new ArgumentNullException("a");
            if (y == null) throw new ArgumentNullException("y");
            GemmSmoothed(new ReadOnlySpan<ushort>(a), aType, AsSpan(smooth), new Span<ushort>(y), yType, AsSpan(bias),
                options);
        }

        /// <summary>Array overload of GemmSmoothed on 16-bit activations giving float outputs;
        /// smooth and bias may be null.</summary>
        public void GemmSmoothed(ushort[] a, ElementType aType, float[] smooth, float[] y, float[] bias = null,
            GemmOptions options = null)
        {
            if (a == null) throw new ArgumentNullException("a");
            if (y == null) throw new ArgumentNullException("y");
            GemmSmoothed(new ReadOnlySpan<ushort>(a), aType, AsSpan(smooth), new Span<float>(y), AsSpan(bias), options);
        }

        /// <summary>Array overload of GemmSmoothed on float activations giving 16-bit outputs;
        /// smooth and bias may be null.</summary>
        public void GemmSmoothed(float[] a, float[] smooth, ushort[] y, ElementType yType, float[] bias = null,
            GemmOptions options = null)
        {
            if (a == null) throw new ArgumentNullException("a");
            if (y == null) throw new ArgumentNullException("y");
            GemmSmoothed(new ReadOnlySpan<float>(a), AsSpan(smooth), new Span<ushort>(y), yType, AsSpan(bias), options);
        }

        /// <summary>
        /// GemmSmoothed with a residual added to the result (dynq_gemm_residual): y[i][j] =
        /// act(product + bias[j]) + residual[i][j], the epilogue first, then one float addition
        /// of the residual element (widened exactly), then the rounding to y's type. This is the
        /// skip connection of a transformer block (x + Linear(h)) fused into the product; y
        /// equals GemmSmoothed with float outputs followed by that addition, bit for bit.
        /// <paramref name="residual"/> has y's element type and is empty (then this is
        /// GemmSmoothed) or exactly y's length, m rows of N values; it must not share memory with
        /// <paramref name="y"/> (to accumulate into y, copy it first). NaN or infinity in the
        /// residual gives NaN or infinity in that element only. Otherwise as GemmSmoothed.
        /// </summary>
        /// <exception cref="ArgumentException">A length does not fit the shape: residual has
        /// neither 0 values nor y's length (ParamName "residual"), or smooth, a, y or bias.</exception>
        /// <exception cref="DynqException">InvalidArgument for y overlapping residual ("y overlaps
        /// residual; the output must be a separate buffer ..."), and as GemmSmoothed. y is then
        /// left untouched.</exception>
        public void GemmResidual(ReadOnlySpan<float> a, ReadOnlySpan<float> smooth, ReadOnlySpan<float> residual,
            Span<float> y, ReadOnlySpan<float> bias, GemmOptions options = null)
        {
            fixed (float* ap = &MemoryMarshal.GetReference(a))
            fixed (float* rp = &MemoryMarshal.GetReference(residual))
            fixed (float* yp = &MemoryMarshal.GetReference(y))
            {
                GemmEx(ap, a.Length, ElementType.F32, false, yp, y.Length, ElementType.F32, false, smooth, rp,
                    residual.Length, NativeFunction.GemmResidual, bias, options);
            }
        }

        /// <summary>
        /// GemmResidual followed by a layer norm of each output row (dynq_gemm_layer_norm):
        /// y[i] = LayerNorm(act(product + bias) + residual)[i] * lnScale + lnBias over the row's N
        /// values, the post-LN transformer block (BERT's LayerNorm(x + Linear(h))) in one call,
        /// with dynq's fixed arithmetic (64 lane sums, a halving tree, a two-pass variance): the
        /// same bits on every CPU and thread count. <paramref name="residual"/> is empty (none)
        /// or y's length; <paramref name="lnScale"/> has N values, <paramref name="lnBias"/> 0
        /// (none) or N; <paramref name="lnEpsilon"/> is finite and &gt;= 0 (1e-5 is ONNX's
        /// default). Otherwise as GemmResidual.
        /// </summary>
        /// <exception cref="ArgumentException">lnScale or lnBias of another length (and as
        /// GemmResidual).</exception>
        /// <exception cref="DynqException">NonFinite for NaN or infinity in lnScale or lnBias,
        /// InvalidArgument for a bad epsilon (and as GemmResidual); y is then untouched.</exception>
        public void GemmLayerNorm(ReadOnlySpan<float> a, ReadOnlySpan<float> residual, ReadOnlySpan<float> lnScale,
            ReadOnlySpan<float> lnBias, float lnEpsilon, Span<float> y, ReadOnlySpan<float> smooth,
            ReadOnlySpan<float> bias, GemmOptions options = null)
        {
            fixed (float* ap = &MemoryMarshal.GetReference(a))
            fixed (float* rp = &MemoryMarshal.GetReference(residual))
            fixed (float* yp = &MemoryMarshal.GetReference(y))
            {
                GemmEx(ap, a.Length, ElementType.F32, false, yp, y.Length, ElementType.F32, false, smooth, rp,
                    residual.Length, NativeFunction.GemmLayerNorm, bias, lnScale, lnBias, lnEpsilon, options);
            }
        }

        /// <summary>GemmLayerNorm on float16 or bfloat16 activations (<paramref name="aType"/>)
        /// giving float16 or bfloat16 outputs (<paramref name="yType"/>, also the residual's type),
        /// as ushort bit patterns: the rounded sums are normalized, then rounded again.</summary>
        public void GemmLayerNorm(ReadOnlySpan<ushort> a, ElementType aType, ReadOnlySpan<ushort> residual,
            ReadOnlySpan<float> lnScale, ReadOnlySpan<float> lnBias, float lnEpsilon, Span<ushort> y, ElementType yType,
            ReadOnlySpan<float> smooth, ReadOnlySpan<float> bias, GemmOptions options = null)
        {
            fixed (ushort* ap = &MemoryMarshal.GetReference(a))
            fixed (ushort* rp = &MemoryMarshal.GetReference(residual))
            fixed (ushort* yp = &MemoryMarshal.GetReference(y))
            {
                GemmEx(ap, a.Length, aType, true, yp, y.Length, yType, true, smooth, rp, residual.Length,
                    NativeFunction.GemmLayerNorm, bias, lnScale, lnBias, lnEpsilon, options);
            }
        }

        /// <summary>GemmResidual on float data, without bias.</summary>
        public void GemmResidual(ReadOnlySpan<float> a, ReadOnlySpan<float> smooth, ReadOnlySpan<float> residual,
            Span<float> y, GemmOptions options = null)
        {
            GemmResidual(a, smooth, residual, y, ReadOnlySpan<float>.Empty, options);
        }

        /// <summary>GemmResidual on float16 or bfloat16 activations (<paramref name="aType"/>)
        /// giving float16 or bfloat16 outputs (<paramref name="yType"/>, also the type of the
        /// residual), as ushort bit patterns. F32 for 16-bit data throws ArgumentException.</summary>
        public void GemmResidual(ReadOnlySpan<ushort> a, ElementType aType, ReadOnlySpan<float> smooth,
            ReadOnlySpan<ushort> residual, Span<ushort> y, ElementType yType, ReadOnlySpan<float> bias,
            GemmOptions options = null)
        {
            fixed (ushort* ap = &MemoryMarshal.GetReference(a))
            fixed (ushort* rp = &MemoryMarshal.GetReference(residual))
            fixed (ushort* yp = &MemoryMarshal.GetReference(y))
            {
                GemmEx(ap, a.Length, aType, true, yp, y.Length, yType, true, smooth, rp, residual.Length,
                    NativeFunction.GemmResidual, bias, options);
            }
        }

        /// <summary>GemmResidual on 16-bit activations and outputs, without bias.</summary>
        public void GemmResidual(ReadOnlySpan<ushort> a, ElementType aType, ReadOnlySpan<float> smooth,
            ReadOnlySpan<ushort> residual, Span<ushort> y, ElementType yType, GemmOptions options = null)
        {
            GemmResidual(a, aType, smooth, residual, y, yType, ReadOnlySpan<float>.Empty, options);
        }

        /// <summary>GemmResidual on 16-bit activations (<paramref name="aType"/>) giving float
        /// outputs, with a float residual.</summary>
        public void GemmResidual(ReadOnlySpan<ushort> a, ElementType aType, ReadOnlySpan<float> smooth,
            ReadOnlySpan<float> residual, Span<float> y, ReadOnlySpan<float> bias, GemmOptions options = null)
        {
            fixed (ushort* ap = &MemoryMarshal.GetReference(a))
            fixed (float* rp = &MemoryMarshal.GetReference(residual))
            fixed (float* yp = &MemoryMarshal.GetReference(y))
            {
                GemmEx(ap, a.Length, aType, true, yp, y.Length, ElementType.F32, false, smooth, rp, residual.Length,
                    NativeFunction.GemmResidual, bias, options);
            }
        }

        /// <summary>GemmResidual on 16-bit activations giving float outputs, without bias.</summary>
        public void GemmResidual(ReadOnlySpan<ushort> a, ElementType aType, ReadOnlySpan<float> smooth,
            ReadOnlySpan<float> residual, Span<float> y, GemmOptions options = null)
        {
            GemmResidual(a, aType, smooth, residual, y, ReadOnlySpan<float>.Empty, options);
        }

        /// <summary>GemmResidual on float activations giving 16-bit outputs (<paramref name="yType"/>,
        /// also the type of the residual).</summary>
        public void GemmResidual(ReadOnlySpan<float> a, ReadOnlySpan<float> smooth, ReadOnlySpan<ushort> residual,
            Span<ushort> y, ElementType yType, ReadOnlySpan<float> bias, GemmOptions options = null)
        {
            fixed (float* ap = &MemoryMarshal.GetReference(a))
            fixed (ushort* rp = &MemoryMarshal.GetReference(residual))
            fixed (ushort* yp = &MemoryMarshal.GetReference(y))
            {
                GemmEx(ap, a.Length, ElementType.F32, false, yp, y.Length, yType, true, smooth, rp, residual.Length,
                    NativeFunction.GemmResidual, bias, options);
            }
        }

        /// <summary>GemmResidual on float activations giving 16-bit outputs, without bias.</summary>
        public void GemmResidual(ReadOnlySpan<float> a, ReadOnlySpan<float> smooth, ReadOnlySpan<ushort> residual,
            Span<ushort> y, ElementType yType, GemmOptions options = null)
        {
            GemmResidual(a, smooth, residual, y, yType, ReadOnlySpan<float>.Empty, options);
        }

        /// <summary>Array overload of GemmResidual on float data: writes y (m * N values);
        /// smooth, residual (then this is GemmSmoothed) and bias may be null.</summary>
        public void GemmResidual(float[] a, float[] smooth, float[] residual, float[] y, float[] bias = null,
            GemmOptions options = null)
        {
            if (a == null) throw new ArgumentNullException("a");
            if (y == null) throw new ArgumentNullException("y");
            GemmResidual(new ReadOnlySpan<float>(a), AsSpan(smooth), AsSpan(residual), new Span<float>(y), AsSpan(bias),
                options);
        }

        /// <summary>Array overload of GemmResidual on 16-bit activations and outputs; smooth,
        /// residual and bias may be null.</summary>
        public void GemmResidual(ushort[] a, ElementType aType, float[] smooth, ushort[] residual, ushort[] y,
            ElementType yType, float[] bias = null, GemmOptions options = null)
        {
            if (a == null) throw new ArgumentNullException("a");
            if (y == null) throw new ArgumentNullException("y");
            GemmResidual(new ReadOnlySpan<ushort>(a), aType, AsSpan(smooth), AsSpan(residual), new Span<ushort>(y), yType,
                AsSpan(bias), options);
        }

        /// <summary>Array overload of GemmResidual on 16-bit activations giving float outputs;
        /// smooth, residual and bias may be null.</summary>
        public void GemmResidual(ushort[] a, ElementType aType, float[] smooth, float[] residual, float[] y,
            float[] bias = null, GemmOptions options = null)
        {
            if (a == null) throw new ArgumentNullException("a");
            if (y == null) throw new ArgumentNullException("y");
            GemmResidual(new ReadOnlySpan<ushort>(a), aType, AsSpan(smooth), AsSpan(residual), new Span<float>(y),
                AsSpan(bias), options);
        }

        /// <summary>Array overload of GemmResidual on float activations giving 16-bit outputs;
        /// smooth, residual and bias may be null.</summary>
        public void GemmResidual(float[] a, float[] smooth, ushort[] residual, ushort[] y, ElementType yType,
            float[] bias = null, GemmOptions options = null)
        {
            if (a == null) throw new ArgumentNullException("a");
            if (y == null) throw new ArgumentNullException("y");
            GemmResidual(new ReadOnlySpan<float>(a), AsSpan(smooth), AsSpan(residual), new Span<ushort>(y), yType,
                AsSpan(bias), options);
        }

        /// <summary>
        /// GemmSmoothed with the columns of the result sent to several outputs (dynq_gemm_split):
        /// <paramref name="ys"/>[0] receives the first <paramref name="widths"/>[0] columns of the
        /// product, ys[1] the next widths[1], and so on; the widths must add up to N. Each element
        /// is bit for bit that column of GemmSmoothed. This is how layers that read one input (a
        /// transformer's Q, K and V, packed as one matrix with their weights side by side) run as
        /// one call: a is quantized and read once, and each layer gets a matrix of its own, with no
        /// copy. ys[g] holds m rows of widths[g] values, dense (exactly m * widths[g] values; a
        /// Memory may be part of a larger array), m = a.Length / K; all outputs have one element
        /// type. Otherwise as GemmSmoothed.
        /// </summary>
        /// <exception cref="ArgumentNullException">widths or ys is null (or, in the array
        /// overloads, an output).</exception>
        /// <exception cref="ArgumentException">ys and widths differ in length (ParamName
        /// "widths"), a width is negative (ArgumentOutOfRangeException, "widths"), an output has
        /// not m * widths[g] values (ParamName "ys"), or smooth, a or bias do not fit.</exception>
        /// <exception cref="DynqException">InvalidArgument for no outputs, a width of 0, widths
        /// that do not add up to N ("output widths [2, 3] must add up to n = 6"), outputs that
        /// share memory with each other, a, smooth or bias ("outputs[1].y overlaps outputs[0].y;
        /// ..."), and as GemmSmoothed. Every output is then left untouched.</exception>
        public void GemmSplit(ReadOnlySpan<float> a, ReadOnlySpan<float> smooth, int[] widths, Memory<float>[] ys,
            ReadOnlySpan<float> bias, GemmOptions options = null)
        {
            fixed (float* ap = &MemoryMarshal.GetReference(a))
            {
                GemmSplit(ap, a.Length, ElementType.F32, false, smooth, widths, ys, ElementType.F32, false, bias, options);
            }
        }

        /// <summary>
        /// GemmSplit with output g in the attention-head layout <paramref name="heads"/>[g]
        /// (dynq_gemm_split_heads; a default HeadLayout is the dense layout): the m = batch * Seq
        /// rows and the width = Heads * d columns of the output are written as [batch, Heads, Seq,
        /// d], or [batch, Heads, d, Seq] when Transposed, each value bit for bit the dense one; a
        /// transformer's Q, K and V go straight into the tensors attention reads. Each output
        /// still holds m * widths[g] values.
        /// </summary>
        /// <exception cref="ArgumentException">heads and ys differ in length (ParamName "heads"),
        /// a negative Heads or Seq (ArgumentOutOfRangeException), and as GemmSplit.</exception>
        /// <exception cref="DynqException">InvalidArgument for a Seq of 0 or not dividing m ("...
        /// rows are not whole sequences of 5"), Heads not dividing the width ("... columns do not
        /// split into 5 heads"), and as GemmSplit; every output is then left untouched.</exception>
        public void GemmSplitHeads(ReadOnlySpan<float> a, ReadOnlySpan<float> smooth, int[] widths, HeadLayout[] heads,
            Memory<float>[] ys, ReadOnlySpan<float> bias, GemmOptions options = null)
        {
            if (heads == null) throw new ArgumentNullException("heads");
            fixed (float* ap = &MemoryMarshal.GetReference(a))
            {
                GemmSplit(ap, a.Length, ElementType.F32, false, smooth, widths, ys, ElementType.F32, false, bias, options,
                    heads);
            }
        }

        /// <summary>GemmSplitHeads on float16 or bfloat16 activations (<paramref name="aType"/>)
        /// giving float16 or bfloat16 outputs (<paramref name="yType"/>, all of them) as ushort bit
        /// patterns: each value is GemmSplit's, at its head-layout place.</summary>
        public void GemmSplitHeads(ReadOnlySpan<ushort> a, ElementType aType, ReadOnlySpan<float> smooth, int[] widths,
            HeadLayout[] heads, Memory<ushort>[] ys, ElementType yType, ReadOnlySpan<float> bias, GemmOptions options = null)
        {
            if (heads == null) throw new ArgumentNullException("heads");
            fixed (ushort* ap = &MemoryMarshal.GetReference(a))
            {
                GemmSplit(ap, a.Length, aType, true, smooth, widths, ys, yType, true, bias, options, heads);
            }
        }

        /// <summary>GemmSplitHeads on float activations giving float16 or bfloat16 outputs
        /// (<paramref name="yType"/>, all of them).</summary>
        public void GemmSplitHeads(ReadOnlySpan<float> a, ReadOnlySpan<float> smooth, int[] widths, HeadLayout[] heads,
            Memory<ushort>[] ys, ElementType yType, ReadOnlySpan<float> bias, GemmOptions options = null)
        {
            if (heads == null) throw new ArgumentNullException("heads");
            fixed (float* ap = &MemoryMarshal.GetReference(a))
            {
                GemmSplit(ap, a.Length, ElementType.F32, false, smooth, widths, ys, yType, true, bias, options, heads);
            }
        }

        /// <summary>GemmSplit on float data, without bias.</summary>
        public void GemmSplit(ReadOnlySpan<float> a, ReadOnlySpan<float> smooth, int[] widths, Memory<float>[] ys,
            GemmOptions options = null)
        {
            GemmSplit(a, smooth, widths, ys, ReadOnlySpan<float>.Empty, options);
        }

        /// <summary>GemmSplit on float16 or bfloat16 activations (<paramref name="aType"/>) giving
        /// float16 or bfloat16 outputs (<paramref name="yType"/>, all of them), as ushort bit
        /// patterns. F32 for 16-bit data throws ArgumentException.</summary>
        public void GemmSplit(ReadOnlySpan<ushort> a, ElementType aType, ReadOnlySpan<float> smooth, int[] widths,
            Memory<ushort>[] ys, ElementType yType, ReadOnlySpan<float> bias, GemmOptions options = null)
        {
            fixed (ushort* ap = &MemoryMarshal.GetReference(a))
            {
                GemmSplit(ap, a.Length, aType, true, smooth, widths, ys, yType, true, bias, options);
            }
        }

        /// <summary>GemmSplit on 16-bit activations and outputs, without bias.</summary>
        public void GemmSplit(ReadOnlySpan<ushort> a, ElementType aType, ReadOnlySpan<float> smooth, int[] widths,
            Memory<ushort>[] ys, ElementType yType, GemmOptions options = null)
        {
            GemmSplit(a, aType, smooth, widths, ys, yType, ReadOnlySpan<float>.Empty, options);
        }

        /// <summary>GemmSplit on 16-bit activations (<paramref name="aType"/>) giving float outputs.</summary>
        public void GemmSplit(ReadOnlySpan<ushort> a, ElementType aType, ReadOnlySpan<float> smooth, int[] widths,
            Memory<float>[] ys, ReadOnlySpan<float> bias, GemmOptions options = null)
        {
            fixed (ushort* ap = &MemoryMarshal.GetReference(a))
            {
                GemmSplit(ap, a.Length, aType, true, smooth, widths, ys, ElementType.F32, false, bias, options);
            }
        }

        /// <summary>GemmSplit on 16-bit activations giving float outputs, without bias.</summary>
        public void GemmSplit(ReadOnlySpan<ushort> a, ElementType aType, ReadOnlySpan<float> smooth, int[] widths,
            Memory<float>[] ys, GemmOptions options = null)
        {
            GemmSplit(a, aType, smooth, widths, ys, ReadOnlySpan<float>.Empty, options);
        }

        /// <summary>GemmSplit on float activations giving 16-bit outputs (<paramref name="yType"/>,
        /// all of them).</summary>
        public void GemmSplit(ReadOnlySpan<float> a, ReadOnlySpan<float> smooth, int[] widths, Memory<ushort>[] ys,
            ElementType yType, ReadOnlySpan<float> bias, GemmOptions options = null)
        {
            fixed (float* ap = &MemoryMarshal.GetReference(a))
            {
                GemmSplit(ap, a.Length, ElementType.F32, false, smooth, widths, ys, yType, true, bias, options);
            }
        }

        /// <summary>GemmSplit on float activations giving 16-bit outputs, without bias.</summary>
        public void GemmSplit(ReadOnlySpan<float> a, ReadOnlySpan<float> smooth, int[] widths, Memory<ushort>[] ys,
            ElementType yType, GemmOptions options = null)
        {
            GemmSplit(a, smooth, widths, ys, yType, ReadOnlySpan<float>.Empty, options);
        }

        /// <summary>Array overload of GemmSplit on float data: writes each ys[g] (m * widths[g]
        /// values); smooth (then the columns are those of Gemm) and bias may be null.</summary>
        public void GemmSplit(float[] a, float[] smooth, int[] widths, float[][] ys, float[] bias = null,
            GemmOptions options = null)
        {
            if (a == null) throw new ArgumentNullException("a");
            GemmSplit(new ReadOnlySpan<float>(a), AsSpan(smooth), widths, AsMemory(ys), AsSpan(bias), options);
        }

        /// <summary>Array overload of GemmSplit on 16-bit activations and outputs; smooth and bias
        /// may be null.</summary>
        public void GemmSplit(ushort[] a, ElementType aType, float[] smooth, int[] widths, ushort[][] ys,
            ElementType yType, float[] bias = null, GemmOptions options = null)
        {
            if (a == null) throw new ArgumentNullException("a");
            GemmSplit(new ReadOnlySpan<ushort>(a), aType, AsSpan(smooth), widths, AsMemory(ys), yType, AsSpan(bias),
                options);
        }

        /// <summary>Array overload of GemmSplit on 16-bit activations giving float outputs; smooth
        /// and bias may be null.</summary>
        public void GemmSplit(ushort[] a, ElementType aType, float[] smooth, int[] widths, float[][] ys,
            float[] bias = null, GemmOptions options = null)
        {
            if (a == null) throw new ArgumentNullException("a");
            GemmSplit(new ReadOnlySpan<ushort>(a), aType, AsSpan(smooth), widths, AsMemory(ys), AsSpan(bias), options);
        }

        /// <summary>Array overload of GemmSplit on float activations giving 16-bit outputs; smooth
        /// and bias may be null.</summary>
        public void GemmSplit(float[] a, float[] smooth, int[] widths, ushort[][] ys, ElementType yType,
            float[] bias = null, GemmOptions options = null)
        {
            if (a == null) throw new ArgumentNullException("a");
            GemmSplit(new ReadOnlySpan<float>(a), AsSpan(smooth), widths, AsMemory(ys), yType, AsSpan(bias), options);
        }

        /// <summary>The outputs of an array overload of GemmSplit, as Memory.</summary>
        private static Memory<T>[] AsMemory<T>(T[][] ys)
        {
            if (ys == null) throw new ArgumentNullException("ys");
            Memory<T>[] memory = new Memory<T>[ys.Length];
            for (int g = 0; g < ys.Length; g++)
            {
                if (ys[g] == null) throw new ArgumentNullException("ys", string.Format("ys[{0}] is null", g));
                memory[g] = new Memory<T>(ys[g]);
            }
            return memory;
        }

        /// <summary>The checks and the call of dynq_gemm_split. a points to aLength elements of 2
        /// bytes (a16) or 4 (floats), pinned by the caller; the outputs are pinned here for the
        /// call, each with ldy = cols = its width (dense rows).</summary>
        private void GemmSplit<T>(void* a, int aLength, ElementType aType, bool a16, ReadOnlySpan<float> smooth,
            int[] widths, Memory<T>[] ys, ElementType yType, bool y16, ReadOnlySpan<float> bias, GemmOptions options,
            HeadLayout[] heads = null)
        {
            string name = heads == null ? "dynq_gemm_split" : "dynq_gemm_split_heads";
            if (widths == null) throw new ArgumentNullException("widths");
            if (ys == null) throw new ArgumentNullException("ys");
            int n = N, k = K;
            NativeGemmConfig cfg = (options ?? new GemmOptions()).ToNative();
            if (ys.Length != widths.Length)
            {
                throw new ArgumentException(string.Format("ys has {0} outputs and widths {1} values: one width per output",
                    ys.Length, widths.Length), "widths");
            }
            // One record more than outputs, so that the table has an address even without outputs
            // (the library then reports num_outputs 0).
            NativeOutput[] outputs = new NativeOutput[ys.Length + 1];
            NativeHeads[] layouts = new NativeHeads[ys.Length + 1];
            if (heads != null)
            {
                if (heads.Length != ys.Length)
                {
                    throw new ArgumentException(string.Format("heads has {0} layouts for {1} outputs: one per output",
                        heads.Length, ys.Length), "heads");
                }
                for (int g = 0; g < heads.Length; g++)
                {
                    if (heads[g].Heads < 0 || heads[g].Seq < 0)
                    {
                        throw new ArgumentOutOfRangeException("heads", string.Format(
                            "heads[{0}]: Heads ({1}) and Seq ({2}) must not be negative", g, heads[g].Heads, heads[g].Seq));
                    }
                    layouts[g].Heads = (UIntPtr)heads[g].Heads;
                    layouts[g].Seq = (UIntPtr)heads[g].Seq;
                    layouts[g].Transposed = heads[g].Transposed ? 1u : 0u;
                }
            }
            for (int g = 0; g < widths.Length; g++)
            {
                if (widths[g] < 0)
                {
                    throw new ArgumentOutOfRangeException("widths", string.Format("widths[{0}] = {1} is negative", g, widths[g]));
                }
                outputs[g].Ldy = (UIntPtr)widths[g];
                outputs[g].Cols = (UIntPtr)widths[g];
            }
            if (!IsKnown(aType) || !IsKnown(yType))
            {
                // The library names the bad value, with m = 0 and no buffers, as in GemmEx.
                fixed (NativeOutput* op = outputs)
                {
                    Native.Check(Native.dynq_gemm_split(_handle, null, (uint)aType, UIntPtr.Zero, (UIntPtr)k, null, null,
                        op, (UIntPtr)ys.Length, (uint)yType, &cfg), name);
                }
                throw new ArgumentException(string.Format("element types {0} and {1}: this binding knows F32, F16 and BF16 only",
                    aType, yType), IsKnown(aType) ? "yType" : "aType");
            }
            if (a16 && aType == ElementType.F32)
            {
                throw new ArgumentException("aType is F32 for 16-bit data; float activations take the float overloads", "aType");
            }
            if (y16 && yType == ElementType.F32)
            {
                throw new ArgumentException("yType is F32 for 16-bit data; float outputs take the float overloads", "yType");
            }
            if (aLength % k != 0)
            {
                throw new ArgumentException(string.Format("a has {0} values, not a multiple of K = {1}", aLength, k), "a");
            }
            int m = aLength / k;
            if (bias.Length != 0 && bias.Length != n)
            {
                throw new ArgumentException(string.Format("bias has {0} values, expected 0 or N = {1}", bias.Length, n), "bias");
            }
            if (smooth.Length != 0 && smooth.Length != k)
            {
                throw new ArgumentException(string.Format(
                    "smooth has {0} values, expected 0 or K = {1} (one factor per input channel)", smooth.Length, k), "smooth");
            }
            for (int g = 0; g < ys.Length; g++)
            {
                if ((long)ys[g].Length != (long)m * widths[g])
                {
                    throw new ArgumentException(string.Format("ys[{0}] has {1} values, expected m * widths[{0}] = {2} * {3} = {4}",
                        g, ys[g].Length, m, widths[g], (long)m * widths[g]), "ys");
                }
            }
            MemoryHandle[] pins = new MemoryHandle[ys.Length];
            try
            {
                for (int g = 0; m > 0 && g < ys.Length; g++)
                {
                    if (ys[g].Length == 0) continue; // a width of 0, which the library refuses
                    pins[g] = ys[g].Pin();
                    outputs[g].Y = (IntPtr)pins[g].Pointer;
                }
                fixed (NativeOutput* op = outputs)
                fixed (NativeHeads* hp = layouts)
                fixed (float* sp = &MemoryMarshal.GetReference(smooth))
                fixed (float* bp = &MemoryMarshal.GetReference(bias))
                {
                    Status st = heads == null
                        ? Native.dynq_gemm_split(_handle, m == 0 ? null : a, (uint)aType, (UIntPtr)m, (UIntPtr)k,
                            smooth.Length == 0 ? null : sp, bias.Length == 0 ? null : bp, op, (UIntPtr)ys.Length,
                            (uint)yType, &cfg)
                        : Native.dynq_gemm_split_heads(_handle, m == 0 ? null : a, (uint)aType, (UIntPtr)m, (UIntPtr)k,
                            smooth.Length == 0 ? null : sp, bias.Length == 0 ? null : bp, op, hp, (UIntPtr)ys.Length,
                            (uint)yType, &cfg);
                    Native.Check(st, name);
                }
            }
            finally
            {
                for (int g = 0; g < pins.Length; g++) pins[g].Dispose();
            }
        }

        private static ReadOnlySpan<float> AsSpan(float[] v)
        {
            return v == null ? ReadOnlySpan<float>.Empty : new ReadOnlySpan<float>(v);
        }

        private static ReadOnlySpan<ushort> AsSpan(ushort[] v)
        {
            return v == null ? ReadOnlySpan<ushort>.Empty : new ReadOnlySpan<ushort>(v);
        }

        /// <summary>The C function that the private GemmEx calls.</summary>
        private enum NativeFunction
        {
            GemmEx,
            GemmSmoothed,
            GemmResidual,
            GemmLayerNorm,
        }

        /// <summary>The checks and the call of dynq_gemm_ex, dynq_gemm_smoothed (smooth empty or
        /// K values) or dynq_gemm_residual (also residual: residualLength 0 or yLength elements
        /// of y's type), as <paramref name="function"/> says. a, y and residual point to aLength,
        /// yLength and residualLength elements of 2 bytes (a16, y16) or 4 (floats), pinned by the
        /// caller.</summary>
        private void GemmEx(void* a, int aLength, ElementType aType, bool a16, void* y, int yLength,
            ElementType yType, bool y16, ReadOnlySpan<float> smooth, void* residual, int residualLength,
            NativeFunction function, ReadOnlySpan<float> bias, GemmOptions options)
        {
            GemmEx(a, aLength, aType, a16, y, yLength, yType, y16, smooth, residual, residualLength, function, bias,
                ReadOnlySpan<float>.Empty, ReadOnlySpan<float>.Empty, 0f, options);
        }

        /// <summary>GemmEx with the layer norm of dynq_gemm_layer_norm (function GemmLayerNorm:
        /// lnScale N values, lnBias empty or N).</summary>
        private void GemmEx(void* a, int aLength, ElementType aType, bool a16, void* y, int yLength,
            ElementType yType, bool y16, ReadOnlySpan<float> smooth, void* residual, int residualLength,
            NativeFunction function, ReadOnlySpan<float> bias, ReadOnlySpan<float> lnScale, ReadOnlySpan<float> lnBias,
            float lnEpsilon, GemmOptions options)
        {
            int n = N, k = K;
            string name = function == NativeFunction.GemmLayerNorm ? "dynq_gemm_layer_norm"
                : function == NativeFunction.GemmResidual ? "dynq_gemm_residual"
                : function == NativeFunction.GemmSmoothed ? "dynq_gemm_smoothed" : "dynq_gemm_ex";
            float lnEps = lnEpsilon;
            if (function == NativeFunction.GemmLayerNorm)
            {
                if (lnScale.Length != n)
                {
                    throw new ArgumentException(string.Format("lnScale has {0} values, expected N = {1}", lnScale.Length, n),
                        "lnScale");
                }
                if (lnBias.Length != 0 && lnBias.Length != n)
                {
                    throw new ArgumentException(string.Format("lnBias has {0} values, expected 0 (none) or N = {1}",
                        lnBias.Length, n), "lnBias");
                }
            }
            NativeGemmConfig cfg = (options ?? new GemmOptions()).ToNative();
            if (!IsKnown(aType) || !IsKnown(yType))
            {
                // The library names the bad value. It gets no buffers and m = 0, so nothing can
                // be read or written whatever size it gives the type; should a newer library know
                // the type, this binding still does not.
                Native.Check(CallGemm(function, null, aType, 0, k, null, null, null, null, yType, n, &cfg), name);
                throw new ArgumentException(string.Format("element types {0} and {1}: this binding knows F32, F16 and BF16 only",
                    aType, yType), IsKnown(aType) ? "yType" : "aType");
            }
            if (a16 && aType == ElementType.F32)
            {
                throw new ArgumentException("aType is F32 for 16-bit data; float activations take the float overloads", "aType");
            }
            if (y16 && yType == ElementType.F32)
            {
                throw new ArgumentException("yType is F32 for 16-bit data; float outputs take the float overloads", "yType");
            }
            int m = CheckGemmShape(aLength, yLength, bias.Length);
            if (smooth.Length != 0 && smooth.Length != k)
            {
                throw new ArgumentException(string.Format(
                    "smooth has {0} values, expected 0 or K = {1} (one factor per input channel)", smooth.Length, k), "smooth");
            }
            if (residualLength != 0 && residualLength != yLength)
            {
                throw new ArgumentException(string.Format(
                    "residual has {0} values, expected 0 (none) or y's length m * N = {1} * {2} = {3}", residualLength, m,
                    n, yLength), "residual");
            }
            fixed (float* sp = &MemoryMarshal.GetReference(smooth))
            fixed (float* bp = &MemoryMarshal.GetReference(bias))
            fixed (float* gp = &MemoryMarshal.GetReference(lnScale))
            fixed (float* lbp = &MemoryMarshal.GetReference(lnBias))
            {
                if (function == NativeFunction.GemmLayerNorm)
                {
                    Native.Check(Native.dynq_gemm_layer_norm(_handle, m == 0 ? null : a, (uint)aType, (UIntPtr)m, (UIntPtr)k,
                        smooth.Length == 0 ? null : sp, bias.Length == 0 ? null : bp,
                        m == 0 || residualLength == 0 ? null : residual, (UIntPtr)n, gp, lnBias.Length == 0 ? null : lbp,
                        lnEps, m == 0 ? null : y, (uint)yType, (UIntPtr)n, &cfg), name);
                    return;
                }
                Native.Check(CallGemm(function, m == 0 ? null : a, aType, m, k, smooth.Length == 0 ? null : sp,
                    bias.Length == 0 ? null : bp, m == 0 || residualLength == 0 ? null : residual, m == 0 ? null : y,
                    yType, n, &cfg), name);
            }
        }

        /// <summary>One call of the C function; the residual (NULL: none) has stride N, like y.</summary>
        private Status CallGemm(NativeFunction function, void* a, ElementType aType, int m, int k, float* smooth,
            float* bias, void* residual, void* y, ElementType yType, int n, NativeGemmConfig* cfg)
        {
            switch (function)
            {
                case NativeFunction.GemmResidual:
                    return Native.dynq_gemm_residual(_handle, a, (uint)aType, (UIntPtr)m, (UIntPtr)k, smooth, bias,
                        residual, (UIntPtr)n, y, (uint)yType, (UIntPtr)n, cfg);
                case NativeFunction.GemmSmoothed:
                    return Native.dynq_gemm_smoothed(_handle, a, (uint)aType, (UIntPtr)m, (UIntPtr)k, smooth, bias, y,
                        (uint)yType, (UIntPtr)n, cfg);
                default:
                    return Native.dynq_gemm_ex(_handle, a, (uint)aType, (UIntPtr)m, (UIntPtr)k, bias, y, (uint)yType,
                        (UIntPtr)n, cfg);
            }
        }

        private static bool IsKnown(ElementType t)
        {
            return t == ElementType.F32 || t == ElementType.F16 || t == ElementType.BF16;
        }

        /// <summary>Checks the lengths of a, y and bias (in elements) and returns m, the rows of a.</summary>
        private int CheckGemmShape(int aLength, int yLength, int biasLength)
        {
            int n = N, k = K;
            if (aLength % k != 0)
            {
                throw new ArgumentException(string.Format("a has {0} values, not a multiple of K = {1}", aLength, k), "a");
            }
            int m = aLength / k;
            if ((long)yLength != (long)m * n)
            {
                throw new ArgumentException(string.Format("y has {0} values, expected m * N = {1} * {2} = {3}",
                    yLength, m, n, (long)m * n), "y");
            }
            if (biasLength != 0 && biasLength != n)
            {
                throw new ArgumentException(string.Format("bias has {0} values, expected 0 or N = {1}", biasLength, n), "bias");
            }
            return m;
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
