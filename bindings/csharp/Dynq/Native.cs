// P/Invoke declarations of the C ABI (include/dynq.h). Internal: the public API is
// PackedWeights, DynqLibrary and the option types. Signatures are blittable (pointers,
// uint, UIntPtr for size_t), so nothing is copied or converted on the way.
using System;
using System.Runtime.InteropServices;
using System.Text;

namespace Dynq
{
    [StructLayout(LayoutKind.Sequential)]
    internal struct NativePackConfig
    {
        public uint StructSize;
        public uint Granularity;
        public uint Isa;
        public uint WeightQmax;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct NativeGemmConfig
    {
        public uint StructSize;
        public uint ActGranularity;
        public uint ActType;
        public uint Epilogue;
        public uint NumThreads;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct NativeInfo
    {
        public uint StructSize;
        public uint Granularity;
        public uint Isa;
        public uint LayoutVersion;
        public UIntPtr N;
        public UIntPtr K;
        public UIntPtr Bytes;
        public UIntPtr SerializedBytes;
        public uint Mr;
        public uint Nr;
        public uint Kr;
        public uint Reserved;
        public IntPtr KernelName;
    }

    /// <summary>One output of dynq_gemm_split (<c>dynq_output</c>): <c>cols</c> columns of the
    /// product, m rows at stride <c>ldy</c> elements from <c>y</c>.</summary>
    [StructLayout(LayoutKind.Sequential)]
    internal struct NativeOutput
    {
        public IntPtr Y;
        public UIntPtr Ldy;
        public UIntPtr Cols;
    }

    /// <summary>The head layout of one output of dynq_gemm_split_heads (<c>dynq_heads</c>).</summary>
    [StructLayout(LayoutKind.Sequential)]
    internal struct NativeHeads
    {
        public UIntPtr Heads;
        public UIntPtr Seq;
        public uint Transposed;
        public uint Reserved;
    }

    /// <summary>Owns a <c>dynq_packed_weights*</c>; released with dynq_packed_weights_free.</summary>
    internal sealed class PackedWeightsHandle : SafeHandle
    {
        public PackedWeightsHandle() : base(IntPtr.Zero, true) { }

        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }

        protected override bool ReleaseHandle()
        {
            Native.dynq_packed_weights_free(handle);
            return true;
        }
    }

    internal static unsafe class Native
    {
        // "dynq": libdynq.so on Linux, found through the NuGet package's runtimes/<rid>/native
        // folder on .NET, or LD_LIBRARY_PATH / the application folder on Mono.
        private const string Lib = "dynq";

        /// <summary>The C ABI version of the dynq.h these declarations follow.</summary>
        internal const uint HeaderAbiVersion = 1;

        [DllImport(Lib)] internal static extern IntPtr dynq_version();
        [DllImport(Lib)] internal static extern uint dynq_abi_version();
        [DllImport(Lib)] internal static extern IntPtr dynq_status_str(uint status);
        [DllImport(Lib)] internal static extern UIntPtr dynq_last_error_message(byte* buf, UIntPtr len);
        [DllImport(Lib)] internal static extern Status dynq_active_isa(uint* isa);
        [DllImport(Lib)] internal static extern IntPtr dynq_isa_name(uint isa);
        [DllImport(Lib)] internal static extern int dynq_isa_available(uint isa);
        [DllImport(Lib)] internal static extern Status dynq_pack_config_init_sized(NativePackConfig* config, UIntPtr size);
        [DllImport(Lib)] internal static extern Status dynq_gemm_config_init(NativeGemmConfig* config);

        [DllImport(Lib)]
        internal static extern Status dynq_pack_weights(float* w, UIntPtr n, UIntPtr k, uint layout,
            NativePackConfig* config, out PackedWeightsHandle result);

        [DllImport(Lib)]
        internal static extern Status dynq_pack_quantized_weights(sbyte* q, UIntPtr n, UIntPtr k, uint layout,
            float* scales, UIntPtr numScales, NativePackConfig* config, out PackedWeightsHandle result);

        [DllImport(Lib)]
        internal static extern Status dynq_packed_weights_get_info(PackedWeightsHandle packed, NativeInfo* info);

        [DllImport(Lib)] internal static extern void dynq_packed_weights_free(IntPtr packed);

        [DllImport(Lib)]
        internal static extern Status dynq_packed_weights_serialize(PackedWeightsHandle packed, byte* buf,
            UIntPtr bufLen, UIntPtr* written);

        [DllImport(Lib)]
        internal static extern Status dynq_packed_weights_deserialize(byte* buf, UIntPtr len,
            NativePackConfig* config, out PackedWeightsHandle result);

        [DllImport(Lib)]
        internal static extern Status dynq_gemm(PackedWeightsHandle packed, float* a, UIntPtr m, UIntPtr lda,
            float* bias, float* y, UIntPtr ldy, NativeGemmConfig* config);

        [DllImport(Lib)]
        internal static extern Status dynq_gemm_ex(PackedWeightsHandle packed, void* a, uint aType, UIntPtr m,
            UIntPtr lda, float* bias, void* y, uint yType, UIntPtr ldy, NativeGemmConfig* config);

        [DllImport(Lib)]
        internal static extern Status dynq_gemm_smoothed(PackedWeightsHandle packed, void* a, uint aType, UIntPtr m,
            UIntPtr lda, float* smooth, float* bias, void* y, uint yType, UIntPtr ldy, NativeGemmConfig* config);

        [DllImport(Lib)]
        internal static extern Status dynq_gemm_residual(PackedWeightsHandle packed, void* a, uint aType, UIntPtr m,
            UIntPtr lda, float* smooth, float* bias, void* residual, UIntPtr ldr, void* y, uint yType, UIntPtr ldy,
            NativeGemmConfig* config);

        [DllImport(Lib)]
        internal static extern Status dynq_gemm_layer_norm(PackedWeightsHandle packed, void* a, uint aType, UIntPtr m,
            UIntPtr lda, float* smooth, float* bias, void* residual, UIntPtr ldr, float* lnScale, float* lnBias,
            float lnEpsilon, void* y, uint yType, UIntPtr ldy, NativeGemmConfig* config);

        [DllImport(Lib)]
        internal static extern Status dynq_gemm_split(PackedWeightsHandle packed, void* a, uint aType, UIntPtr m,
            UIntPtr lda, float* smooth, float* bias, NativeOutput* outputs, UIntPtr numOutputs, uint yType,
            NativeGemmConfig* config);

        [DllImport(Lib)]
        internal static extern Status dynq_gemm_split_heads(PackedWeightsHandle packed, void* a, uint aType, UIntPtr m,
            UIntPtr lda, float* smooth, float* bias, NativeOutput* outputs, NativeHeads* heads, UIntPtr numOutputs,
            uint yType, NativeGemmConfig* config);

        internal static string String(IntPtr p)
        {
            return p == IntPtr.Zero ? null : Marshal.PtrToStringAnsi(p);
        }

        /// <summary>The calling thread's last error message. Read it right after the failing
        /// call, on the same thread: the library keeps it per thread.</summary>
        internal static string LastErrorMessage()
        {
            ulong len = (ulong)dynq_last_error_message(null, UIntPtr.Zero);
            byte[] buf = new byte[checked((int)len + 1)];
            fixed (byte* b = buf)
            {
                dynq_last_error_message(b, (UIntPtr)buf.Length);
            }
            return Encoding.UTF8.GetString(buf, 0, (int)len);
        }

        /// <summary>Throws a DynqException for a failed status.</summary>
        internal static void Check(Status status, string function)
        {
            if (status != Status.Ok)
            {
                throw new DynqException(status, function, LastErrorMessage());
            }
        }
    }
}
