#!/usr/bin/env bash
# Build the descriptor/translation fuzzer with ASan+UBSan and run it for $1 seconds
# (default 20). Exits non-zero on any crash or sanitizer report.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-20}
out=native/fuzz/build
mkdir -p "$out/corpus"
command -v clang >/dev/null || { echo "clang is missing: run 'make setup'" >&2; exit 2; }
clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -Inative/include native/fuzz/fuzz_desc.c native/channel.c native/xlate.c -o "$out/fuzz_desc"
# seeds: an empty region set with a null descriptor, and one valid fragment in a region
printf '\x00\x01' > "$out/corpus/seed-null"
python3 - "$out/corpus" <<'PY'
import struct, sys
region = struct.pack("<QQQII", 0, 65536, 4096, 3, 0)
desc = struct.pack("<QHHHHiIQ", 7, 0, 0, 1, 0, 0, 0, 0) + struct.pack("<QII", 512, 1024, 1)
slots = (desc + b"\0" * (128 - len(desc))) + b"\0" * 384
open(sys.argv[1] + "/seed-frag", "wb").write(b"\x00\x01" + region + b"\0" * 96 + slots + struct.pack("<II", 1, 0))
PY
exec "$out/fuzz_desc" -max_total_time="$secs" -timeout=5 -rss_limit_mb=1024 \
  -print_final_stats=1 "$out/corpus"
