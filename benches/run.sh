#!/usr/bin/env bash
# Every headline figure of tidemark against its reference measured in the same run, as one
# table (issue 9; DESIGN, Performance). Each bench starts its own throwaway PostgreSQL cluster
# (binlog_capture a MariaDB server).
#
#   bash benches/run.sh           # full sizes, 3 rounds each (the figures in benches/README.md)
#   bash benches/run.sh --quick   # small sizes, 3 rounds each, a few minutes
#
# The benches' own output goes to target/bench-run/<bench>.log; the table is printed at the
# end. Nothing is asserted about time.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=false
for arg in "$@"; do
    case "$arg" in
        --quick) quick=true ;;
        *) echo "usage: bash benches/run.sh [--quick]" >&2; exit 2 ;;
    esac
done
if $quick; then
    apply_rows=20000 snapshot_rows=200000 memory_rows=200000 backlog_mib=200 lag_seconds=5
else
    apply_rows=200000 snapshot_rows=2000000 memory_rows=1000000 backlog_mib=2048 lag_seconds=20
fi
logs="${CARGO_TARGET_DIR:-target}/bench-run"
mkdir -p "$logs"

bench() {
    local name=$1 rows=$2
    echo "running $name → $logs/$name.log" >&2
    TIDEMARK_BENCH_ROWS=$rows TIDEMARK_BENCH_REPEAT=3 cargo bench --bench "$name" \
        >"$logs/$name.log" 2>&1 || { tail -20 "$logs/$name.log" >&2; exit 1; }
}
bench merge_apply "$apply_rows"
bench binlog_capture "$apply_rows"
bench snapshot "$snapshot_rows"
TIDEMARK_BENCH_BACKLOG_MIB=$backlog_mib bench transaction_memory "$memory_rows"
TIDEMARK_BENCH_SECONDS=$lag_seconds bench lag 0

# A bench's summary line that starts with $2: its last three columns are median, min, max.
summary() { grep -F -- "$2" "$logs/$1.log" | head -1; }
# The median, for ratios.
rate() { summary "$@" | awk '{ print $(NF-2) }'; }
# The median with the rounds' min and max.
spread() { summary "$@" | awk '{ printf "%s (%s–%s)", $(NF-2), $(NF-1), $NF }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f×", a / b; else print "-" }'; }
row() { printf '| %s | %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" "$5"; }

capture=$(rate merge_apply "tidemark capture only")
binlog_capture=$(rate binlog_capture "tidemark MySQL capture")
mariadb_binlog=$(rate binlog_capture "mariadb-binlog --verbose")
recvlogical=$(rate merge_apply "pg_recvlogical")
native=$(rate merge_apply "native logical replication")
apply=$(rate merge_apply "tidemark merge apply alone")
end_to_end=$(rate merge_apply "tidemark end to end (capture + merge)")
scd2=$(rate merge_apply "tidemark scd2 apply alone")
copy=$(rate snapshot "COPY TO STDOUT | COPY FROM STDIN")
one=$(rate snapshot "tidemark snapshot, 1 stream (end to end)")
many=$(rate snapshot "streams (end to end)")
p50=$(rate lag "p50 ms")
p99=$(rate lag "p99 ms")
lag_max=$(rate lag "max ms")
peak_rss() { grep -F "agent peak RSS" "$logs/transaction_memory.log" | sed -n "$1p" | sed -E 's/.*\(VmHWM\): *([0-9.]+ MiB).*/\1/'; }
rss=$(peak_rss 1)
tables_rss=$(peak_rss 2)
backlog_rss=$(peak_rss 3)

echo
echo "medians of 3 rounds (min–max), rows/s; $(nproc) cores; $(grep -o 'PostgreSQL [0-9.]*' "$logs/merge_apply.log" | head -1);" \
    "$(grep -o 'MariaDB [0-9.]*' "$logs/binlog_capture.log" | head -1)"
echo
row metric tidemark "reference (same run)" ratio goal
row --- --- --- --- ---
row "capture: changes/s durably logged" "$(spread merge_apply "tidemark capture only")" \
    "pg_recvlogical: $(spread merge_apply "pg_recvlogical")" "$(ratio "$capture" "$recvlogical")" "≥ 0.9×"
row "MySQL binlog capture: changes/s durably logged" "$(spread binlog_capture "tidemark MySQL capture")" \
    "mariadb-binlog: $(spread binlog_capture "mariadb-binlog --verbose")" \
    "$(ratio "$binlog_capture" "$mariadb_binlog")" "none set (PostgreSQL's: ≥ 0.9×)"
row "end to end, capture + merge: rows/s" "$(spread merge_apply "tidemark end to end (capture + merge)")" \
    "native logical replication: $(spread merge_apply "native logical replication")" \
    "$(ratio "$end_to_end" "$native")" "≥ 2.0× (DESIGN)"
row "merge apply: rows/s" "$(spread merge_apply "tidemark merge apply alone")" \
    "native logical replication: $(spread merge_apply "native logical replication")" \
    "$(ratio "$apply" "$native")" "≥ 3×"
row "scd2 apply: changes/s" "$(spread merge_apply "tidemark scd2 apply alone")" "merge apply: $apply" \
    "$(ratio "$scd2" "$apply")" "≥ 0.7×"
row "snapshot, 1 stream: rows/s" "$(spread snapshot "tidemark snapshot, 1 stream (end to end)")" \
    "COPY \\| COPY: $(spread snapshot "COPY TO STDOUT | COPY FROM STDIN")" "$(ratio "$one" "$copy")" \
    "≥ 0.8× (DESIGN: ≥ 1.0×)"
row "snapshot, $(nproc) streams: rows/s" "$(spread snapshot "streams (end to end)")" "COPY \\| COPY: $copy" \
    "$(ratio "$many" "$copy")" "≥ 1.5×"
row "end-to-end lag p50 / p99 / max at 2,000 tx/s (merge)" "$p50 / $p99 / $lag_max ms" "-" "-" \
    "p50 < 5 ms, p99 < 20 ms"
row "peak RSS, one $memory_rows-row transaction" "$rss" "-" "-" "< 64 MiB"
row "peak RSS, the same into merge + SCD2 sinks" "$tables_rss" "-" "-" "< 64 MiB"
row "peak RSS, catching up on $backlog_mib MiB of WAL" "$backlog_rss" "-" "-" "< 64 MiB"
