#!/usr/bin/env bash
# Tests the C# binding with Mono (there is no .NET SDK on these machines): compiles the
# library and the test program from the same sources the SDK-style projects use, with
# warnings as errors, runs the tests, then compiles and runs the README example from an
# application folder holding Dynq.dll and libdynq.so (the layout of a deployed app).
#
# It installs dynq into DYNQ_PREFIX (default: target/dynq-prefix) with scripts/install.sh.
# Needs mcs and mono (scripts/setup.sh installs mono-mcs). Outputs go to target/csharp/.
#
# Usage (from anywhere): bindings/csharp/test.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
prefix=${DYNQ_PREFIX:-$root/target/dynq-prefix}
here=$root/bindings/csharp
out=$root/target/csharp

for tool in mcs mono; do
    command -v "$tool" >/dev/null || { echo "test.sh: $tool not found (apt-get install mono-mcs)" >&2; exit 1; }
done
"$root/scripts/install.sh" "$prefix" >/dev/null
rm -rf "$out"
mkdir -p "$out/app"
mono --version | head -n 1

echo "== project file"
# The SDK compiles every .cs under Dynq/ (default globbing); mcs gets the same list here.
python3 - "$here/Dynq/Dynq.csproj" "$here/Dynq.Tests/Dynq.Tests.csproj" <<'PY'
import sys, xml.etree.ElementTree as ET
lib = ET.parse(sys.argv[1]).getroot()
assert lib.get("Sdk") == "Microsoft.NET.Sdk", "Dynq.csproj is not SDK-style"
packed = [n.get("PackagePath") for n in lib.iter("None") if n.get("Pack") == "true"]
assert "runtimes/linux-x64/native/libdynq.so" in packed, f"native library not packed: {packed}"
assert lib.find("PropertyGroup/AllowUnsafeBlocks").text == "true"
tests = ET.parse(sys.argv[2]).getroot()
refs = [n.get("Include") for n in tests.iter("ProjectReference")]
assert refs == ["../Dynq/Dynq.csproj"], refs
print("Dynq.csproj: SDK-style, packs runtimes/linux-x64/native/libdynq.so")
PY

echo "== compile (mcs, warnings as errors)"
mcs -target:library -unsafe -warnaserror+ -langversion:7.2 -doc:"$out/Dynq.xml" -out:"$out/Dynq.dll" "$here"/Dynq/*.cs
mcs -target:exe -unsafe -warnaserror+ -langversion:7.2 -r:"$out/Dynq.dll" -out:"$out/Dynq.Tests.exe" "$here"/Dynq.Tests/*.cs

echo "== tests (mono)"
DYNQ_HEADER="$prefix/include/dynq.h" LD_LIBRARY_PATH="$prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    mono --debug "$out/Dynq.Tests.exe" | tee "$out/tests.log"

echo "== README example"
# The first ```csharp block is the program, the first ```text block after it its output.
awk '/^```csharp$/ { on = 1; next } on && /^```$/ { exit } on' "$here/README.md" >"$out/app/Example.cs"
awk '/^```csharp$/ { seen = 1 } seen && /^```text$/ { on = 1; next } on && /^```$/ { exit } on' \
    "$here/README.md" >"$out/expected.txt"
[[ -s "$out/app/Example.cs" && -s "$out/expected.txt" ]] || { echo "README.md: example or its output not found" >&2; exit 1; }
cp "$out/Dynq.dll" "$out/app/"
cp -L "$prefix/lib/libdynq.so" "$out/app/libdynq.so"
mcs -warnaserror+ -langversion:7.2 -r:"$out/app/Dynq.dll" -out:"$out/app/Example.exe" "$out/app/Example.cs"
(cd "$out/app" && env -u LD_LIBRARY_PATH mono Example.exe) >"$out/actual.txt"
if ! diff -u "$out/expected.txt" "$out/actual.txt"; then
    echo "README example output differs from README.md (above: expected vs actual)" >&2
    exit 1
fi
echo "README example: output matches"
