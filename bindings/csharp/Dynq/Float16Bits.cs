// Conversions between float and the bit patterns of float16 and bfloat16, as the library does
// them (the half crate): widening is exact; narrowing rounds to nearest with ties to even,
// overflows to infinity, keeps subnormals and keeps NaN a NaN (quiet, with the sign and the
// leading payload bits).
using System;

namespace Dynq
{
    /// <summary>IEEE binary16 (float16) values as ushort bit patterns: .NET Standard 2.1 and
    /// Mono have no System.Half.</summary>
    public static class Float16Bits
    {
        /// <summary>The float16 bit pattern of <paramref name="value"/> rounded to nearest, ties
        /// to even. Magnitudes of 65520 and above become infinity, those up to 2^-25 zero (signed).</summary>
        public static ushort FromSingle(float value)
        {
            uint b = unchecked((uint)BitConverter.SingleToInt32Bits(value));
            uint sign = (b >> 16) & 0x8000;
            int exp = (int)(b >> 23) & 0xff;
            uint man = b & 0x7fffff;
            if (exp == 0xff)
            {
                // Infinity, or NaN with the quiet bit set (so that a low payload stays NaN).
                return (ushort)(sign | (man == 0 ? 0x7c00u : 0x7e00u | (man >> 13)));
            }
            int e = exp - 127 + 15; // the float16 biased exponent
            if (e >= 0x1f) return (ushort)(sign | 0x7c00);
            uint h, rest, half;
            if (e >= 1)
            {
                // Normal: drop 13 mantissa bits; a carry may reach the exponent (or infinity).
                h = ((uint)e << 10) | (man >> 13);
                rest = man & 0x1fff;
                half = 0x1000;
            }
            else if (e < -10)
            {
                return (ushort)sign; // below 2^-25: rounds to zero
            }
            else
            {
                // Subnormal (units of 2^-24); rounding up the largest gives the smallest normal.
                uint m = man | 0x800000;
                int shift = 14 - e;
                h = m >> shift;
                rest = m & ((1u << shift) - 1);
                half = 1u << (shift - 1);
            }
            if (rest > half || (rest == half && (h & 1) != 0)) h++;
            return (ushort)(sign | h);
        }

        /// <summary>The float value of the float16 bit pattern <paramref name="bits"/>, exactly (a
        /// NaN stays a NaN, with its sign and payload).</summary>
        public static float ToSingle(ushort bits)
        {
            uint sign = (uint)(bits & 0x8000) << 16;
            uint exp = (uint)(bits >> 10) & 0x1f;
            uint man = (uint)bits & 0x3ff;
            uint b;
            if (exp == 0x1f)
            {
                b = sign | 0x7f800000 | (man << 13);
            }
            else if (exp != 0)
            {
                b = sign | ((exp + 127 - 15) << 23) | (man << 13);
            }
            else
            {
                // Zero or subnormal: man * 2^-24, exact.
                b = sign | (uint)BitConverter.SingleToInt32Bits(man * (1f / 16777216f));
            }
            return BitConverter.Int32BitsToSingle(unchecked((int)b));
        }

        /// <summary>Rounds each of <paramref name="values"/> into <paramref name="bits"/> (of the same length).</summary>
        public static void FromSingle(ReadOnlySpan<float> values, Span<ushort> bits)
        {
            CheckLengths(values.Length, bits.Length);
            for (int i = 0; i < values.Length; i++) bits[i] = FromSingle(values[i]);
        }

        /// <summary>Widens each of <paramref name="bits"/> into <paramref name="values"/> (of the same length).</summary>
        public static void ToSingle(ReadOnlySpan<ushort> bits, Span<float> values)
        {
            CheckLengths(values.Length, bits.Length);
            for (int i = 0; i < bits.Length; i++) values[i] = ToSingle(bits[i]);
        }

        /// <summary>The float16 bit patterns of <paramref name="values"/>, in a new array.</summary>
        public static ushort[] FromSingle(float[] values)
        {
            if (values == null) throw new ArgumentNullException("values");
            ushort[] bits = new ushort[values.Length];
            FromSingle(new ReadOnlySpan<float>(values), new Span<ushort>(bits));
            return bits;
        }

        /// <summary>The float values of the float16 bit patterns <paramref name="bits"/>, in a new array.</summary>
        public static float[] ToSingle(ushort[] bits)
        {
            if (bits == null) throw new ArgumentNullException("bits");
            float[] values = new float[bits.Length];
            ToSingle(new ReadOnlySpan<ushort>(bits), new Span<float>(values));
            return values;
        }

        internal static void CheckLengths(int values, int bits)
        {
            if (values != bits)
            {
                throw new ArgumentException(string.Format("{0} values and {1} bit patterns; the lengths must be equal",
                    values, bits), "bits");
            }
        }
    }

    /// <summary>bfloat16 values (the upper half of a float) as ushort bit patterns.</summary>
    public static class BFloat16Bits
    {
        /// <summary>The bfloat16 bit pattern of <paramref name="value"/> rounded to nearest, ties
        /// to even. Magnitudes half a unit or more above the largest bfloat16 (about 3.39e38)
        /// become infinity.</summary>
        public static ushort FromSingle(float value)
        {
            uint b = unchecked((uint)BitConverter.SingleToInt32Bits(value));
            if ((b & 0x7fffffff) > 0x7f800000)
            {
                return (ushort)((b >> 16) | 0x40); // NaN: quiet, so that a low payload stays NaN
            }
            uint h = b >> 16, rest = b & 0xffff;
            if (rest > 0x8000 || (rest == 0x8000 && (h & 1) != 0)) h++;
            return (ushort)h;
        }

        /// <summary>The float value of the bfloat16 bit pattern <paramref name="bits"/>, exactly.</summary>
        public static float ToSingle(ushort bits)
        {
            return BitConverter.Int32BitsToSingle(bits << 16);
        }

        /// <summary>Rounds each of <paramref name="values"/> into <paramref name="bits"/> (of the same length).</summary>
        public static void FromSingle(ReadOnlySpan<float> values, Span<ushort> bits)
        {
            Float16Bits.CheckLengths(values.Length, bits.Length);
            for (int i = 0; i < values.Length; i++) bits[i] = FromSingle(values[i]);
        }

        /// <summary>Widens each of <paramref name="bits"/> into <paramref name="values"/> (of the same length).</summary>
        public static void ToSingle(ReadOnlySpan<ushort> bits, Span<float> values)
        {
            Float16Bits.CheckLengths(values.Length, bits.Length);
            for (int i = 0; i < bits.Length; i++) values[i] = ToSingle(bits[i]);
        }

        /// <summary>The bfloat16 bit patterns of <paramref name="values"/>, in a new array.</summary>
        public static ushort[] FromSingle(float[] values)
        {
            if (values == null) throw new ArgumentNullException("values");
            ushort[] bits = new ushort[values.Length];
            FromSingle(new ReadOnlySpan<float>(values), new Span<ushort>(bits));
            return bits;
        }

        /// <summary>The float values of the bfloat16 bit patterns <paramref name="bits"/>, in a new array.</summary>
        public static float[] ToSingle(ushort[] bits)
        {
            if (bits == null) throw new ArgumentNullException("bits");
            float[] values = new float[bits.Length];
            ToSingle(new ReadOnlySpan<ushort>(bits), new Span<float>(values));
            return values;
        }
    }
}
