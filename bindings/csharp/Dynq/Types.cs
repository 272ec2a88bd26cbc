// The enums and options of the C ABI, with the library's numbers.
using System;

namespace Dynq
{
    /// <summary>Status codes of the C ABI. The numbers are stable and never reused.</summary>
    public enum Status : uint
    {
        /// <summary>Success.</summary>
        Ok = 0,
        /// <summary>A required pointer argument was NULL.</summary>
        NullPointer = 1,
        /// <summary>An argument had a value outside its domain (zero size, unknown enum value, ...).</summary>
        InvalidArgument = 2,
        /// <summary>A size computation overflowed.</summary>
        SizeOverflow = 3,
        /// <summary>An input contained NaN or infinity where finite values are required.</summary>
        NonFinite = 4,
        /// <summary>Valid but not supported here (an ISA the CPU lacks, a newer blob format, k above 65536).</summary>
        Unsupported = 5,
        /// <summary>A serialized blob is truncated, corrupted or not a dynq blob.</summary>
        CorruptData = 6,
        /// <summary>A caller-provided buffer is too small.</summary>
        BufferTooSmall = 7,
        /// <summary>Memory could not be allocated.</summary>
        OutOfMemory = 8,
        /// <summary>A bug in dynq (a caught panic); please report it with the message.</summary>
        Internal = 9,
    }

    /// <summary>Memory layout of a weight matrix.</summary>
    public enum WeightLayout : uint
    {
        /// <summary>[N][K] row-major, one row per output channel (PyTorch Linear, ONNX Gemm transB=1).</summary>
        NK = 0,
        /// <summary>[K][N] row-major, one row per input feature (ONNX MatMul).</summary>
        KN = 1,
    }

    /// <summary>One weight scale per output channel (default) or one for the matrix.</summary>
    public enum WeightGranularity : uint
    {
        /// <summary>One scale per output channel (default).</summary>
        PerChannel = 0,
        /// <summary>One scale for the whole matrix.</summary>
        PerTensor = 1,
    }

    /// <summary>Range of activation quantization: per row, i.e. per token (default), or per tensor.</summary>
    public enum ActGranularity : uint
    {
        /// <summary>One scale and zero point per row of A, i.e. per token (default).</summary>
        PerRow = 0,
        /// <summary>One scale and zero point for all of A (ONNX DynamicQuantizeLinear).</summary>
        PerTensor = 1,
    }

    /// <summary>Activation quantization scheme.</summary>
    public enum ActType : uint
    {
        /// <summary>uint8 with a zero point, as ONNX DynamicQuantizeLinear (default).</summary>
        AsymmetricU8 = 0,
        /// <summary>int8 in [-127, 127], no zero point.</summary>
        SymmetricI8 = 1,
    }

    /// <summary>Operation fused after the bias.</summary>
    public enum Epilogue : uint
    {
        /// <summary>No epilogue (default).</summary>
        None = 0,
        /// <summary>max(y, 0).</summary>
        Relu = 1,
        /// <summary>GELU, erf form: 0.5 * y * (1 + erf(y / sqrt(2))), with dynq's own erf
        /// approximation (error below 3.5e-7), identical on every CPU.</summary>
        Gelu = 2,
        /// <summary>GELU, tanh form (GPT-2's gelu_new, ONNX Runtime's FastGelu):
        /// 0.5 * y * (1 + tanh(sqrt(2/pi) * (y + 0.044715 * y^3))), with dynq's own tanh
        /// approximation (error below 3.5e-7), identical on every CPU.</summary>
        GeluTanh = 3,
        /// <summary>SiLU (Swish), y * sigmoid(y), the gate of LLaMA's MLP: y/2 + y/2 * tanh(y/2)
        /// with the same tanh, identical on every CPU.</summary>
        Silu = 4,
        /// <summary>QuickGELU (CLIP), y * sigmoid(1.702 * y), computed the same way.</summary>
        QuickGelu = 5,
    }

    /// <summary>Element types of activations and outputs of the Gemm overloads on 16-bit data.
    /// .NET Standard 2.1 (and Mono) has no System.Half: float16 and bfloat16 values travel as
    /// their ushort bit patterns (see <see cref="Float16Bits"/> and <see cref="BFloat16Bits"/>).</summary>
    public enum ElementType : uint
    {
        /// <summary>IEEE binary32 (float).</summary>
        F32 = 0,
        /// <summary>IEEE binary16, as ushort bit patterns.</summary>
        F16 = 1,
        /// <summary>bfloat16 (the upper half of a float), as ushort bit patterns.</summary>
        BF16 = 2,
    }

    /// <summary>The attention-head layout of one output of PackedWeights.GemmSplitHeads. The
    /// default value (Heads 0) is the dense layout; otherwise the output's rows are sequences of
    /// Seq tokens and its columns Heads heads, written as [batch, Heads, Seq, d], or [batch, Heads,
    /// d, Seq] when Transposed.</summary>
    public struct HeadLayout
    {
        /// <summary>Number of heads, or 0 for the dense layout.</summary>
        public int Heads;
        /// <summary>Tokens per sequence (m must be a multiple of it).</summary>
        public int Seq;
        /// <summary>[batch, Heads, d, Seq] (transposed keys) instead of [batch, Heads, Seq, d].</summary>
        public bool Transposed;

        /// <summary>A layout of <paramref name="heads"/> heads over sequences of <paramref name="seq"/>.</summary>
        public HeadLayout(int heads, int seq, bool transposed = false)
        {
            Heads = heads;
            Seq = seq;
            Transposed = transposed;
        }
    }

    /// <summary>Kernel families. Auto selects the best the CPU has (or the DYNQ_ISA environment variable).</summary>
    public enum Isa : uint
    {
        /// <summary>The best the CPU supports, or the DYNQ_ISA environment variable.</summary>
        Auto = 0,
        /// <summary>Portable scalar code.</summary>
        Scalar = 1,
        /// <summary>x86-64 AVX2.</summary>
        Avx2 = 2,
        /// <summary>x86-64 AVX-VNNI.</summary>
        AvxVnni = 3,
        /// <summary>x86-64 AVX-512 VNNI.</summary>
        Avx512Vnni = 4,
        /// <summary>AArch64 NEON.</summary>
        Neon = 5,
        /// <summary>AArch64 NEON with dot product instructions.</summary>
        NeonDotprod = 6,
        /// <summary>AArch64 NEON with int8 matrix multiply instructions.</summary>
        NeonI8mm = 7,
        /// <summary>x86-64 AMX-INT8 (tile instructions), with AVX-512 VNNI for the rest.</summary>
        AmxInt8 = 8,
    }

    /// <summary>Options of PackedWeights.Pack, PackQuantized and Load; null means the defaults.</summary>
    public sealed class PackOptions
    {
        /// <summary>Scale granularity (ignored by PackQuantized and Load).</summary>
        public WeightGranularity Granularity { get; set; }
        /// <summary>The kernel family to pack for; Auto by default.</summary>
        public Isa Isa { get; set; }
        /// <summary>Largest quantized weight magnitude for Pack, 1..127, or 0 for the default
        /// (127, 8-bit weights). 64 (ONNX Runtime's reduce_range) halves the weights' resolution
        /// and lets AVX2 CPUs without VNNI run a faster kernel, with the same results on every
        /// CPU. Other values are refused with an InvalidArgument DynqException.</summary>
        public int WeightQmax { get; set; }

        internal unsafe NativePackConfig ToNative()
        {
            NativePackConfig c;
            // The sized init writes exactly the struct this assembly was built with.
            Native.Check(Native.dynq_pack_config_init_sized(&c, (UIntPtr)(uint)sizeof(NativePackConfig)),
                "dynq_pack_config_init_sized");
            c.Granularity = (uint)Granularity;
            c.Isa = (uint)Isa;
            c.WeightQmax = unchecked((uint)WeightQmax);
            return c;
        }
    }

    /// <summary>Options of PackedWeights.Gemm; null means the defaults (per-row asymmetric uint8
    /// activations, no epilogue, default thread count).</summary>
    public sealed class GemmOptions
    {
        /// <summary>Per row (default) or per tensor.</summary>
        public ActGranularity ActGranularity { get; set; }
        /// <summary>Asymmetric uint8 (default) or symmetric int8.</summary>
        public ActType ActType { get; set; }
        /// <summary>None (default) or ReLU.</summary>
        public Epilogue Epilogue { get; set; }
        /// <summary>0 = default (DYNQ_NUM_THREADS, else all cores), 1 = the calling thread only.</summary>
        public int NumThreads { get; set; }

        internal unsafe NativeGemmConfig ToNative()
        {
            if (NumThreads < 0)
            {
                throw new ArgumentOutOfRangeException("NumThreads", NumThreads, "NumThreads must be 0 (default) or more");
            }
            NativeGemmConfig c;
            Native.Check(Native.dynq_gemm_config_init(&c), "dynq_gemm_config_init");
            c.ActGranularity = (uint)ActGranularity;
            c.ActType = (uint)ActType;
            c.Epilogue = (uint)Epilogue;
            c.NumThreads = (uint)NumThreads;
            return c;
        }
    }

    /// <summary>What the library reports about packed weights.</summary>
    public struct PackedWeightsInfo
    {
        /// <summary>Output channels.</summary>
        public int N { get; internal set; }
        /// <summary>Inputs per output channel.</summary>
        public int K { get; internal set; }
        /// <summary>Granularity of the weight scales.</summary>
        public WeightGranularity Granularity { get; internal set; }
        /// <summary>The kernel family the weights are packed for.</summary>
        public Isa Isa { get; internal set; }
        /// <summary>The kernel's name.</summary>
        public string KernelName { get; internal set; }
        /// <summary>Version of that kernel's packed layout.</summary>
        public int LayoutVersion { get; internal set; }
        /// <summary>Native heap bytes held.</summary>
        public long Bytes { get; internal set; }
        /// <summary>Length of the blob Serialize writes.</summary>
        public long SerializedBytes { get; internal set; }
        /// <summary>Tile geometry: rows of A.</summary>
        public int MR { get; internal set; }
        /// <summary>Tile geometry: columns of W.</summary>
        public int NR { get; internal set; }
        /// <summary>Tile geometry: K group.</summary>
        public int KR { get; internal set; }
    }

    /// <summary>A call of the library failed. Message carries the library's detailed message
    /// (LibraryMessage alone), Status its status code.</summary>
    public class DynqException : Exception
    {
        /// <summary>A failure of <paramref name="function"/> with the library's status and message.</summary>
        public DynqException(Status status, string function, string libraryMessage)
            : base(function + ": " + DynqLibrary.StatusString(status) + ": " + libraryMessage)
        {
            Status = status;
            Function = function;
            LibraryMessage = libraryMessage;
        }

        /// <summary>The status the C function returned.</summary>
        public Status Status { get; private set; }
        /// <summary>The C function that failed, e.g. "dynq_gemm".</summary>
        public string Function { get; private set; }
        /// <summary>The library's detailed message, e.g. "activation A[1][2] is inf; activations must be finite".</summary>
        public string LibraryMessage { get; private set; }
    }

    /// <summary>Library-wide information.</summary>
    public static class DynqLibrary
    {
        /// <summary>The library's version, e.g. "0.1.0".</summary>
        public static string Version { get { return Native.String(Native.dynq_version()); } }

        /// <summary>The C ABI version of the loaded library; equals HeaderAbiVersion unless
        /// an incompatible libdynq was loaded.</summary>
        public static int AbiVersion { get { return (int)Native.dynq_abi_version(); } }

        /// <summary>The C ABI version this binding was written for.</summary>
        public static int HeaderAbiVersion { get { return (int)Native.HeaderAbiVersion; } }

        /// <summary>The library's description of a status.</summary>
        public static string StatusString(Status status)
        {
            return Native.String(Native.dynq_status_str((uint)status));
        }

        /// <summary>The library's name of an ISA ("avx2", ...), or "unknown".</summary>
        public static string IsaName(Isa isa) { return Native.String(Native.dynq_isa_name((uint)isa)); }

        /// <summary>Whether this CPU and build can run the ISA.</summary>
        public static bool IsaAvailable(Isa isa) { return Native.dynq_isa_available((uint)isa) != 0; }

        /// <summary>The ISA used when none is forced; throws when DYNQ_ISA names one the CPU lacks.</summary>
        public static unsafe Isa ActiveIsa
        {
            get
            {
                uint isa;
                Native.Check(Native.dynq_active_isa(&isa), "dynq_active_isa");
                return (Isa)isa;
            }
        }
    }
}
