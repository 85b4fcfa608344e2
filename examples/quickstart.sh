#!/usr/bin/env bash
# tidemark quickstart: a throwaway PostgreSQL cluster with a small shop schema, the agent
# capturing it into a JSONL sink and a merge mirror, some changes, the Debezium envelopes that
# came out and the mirrored tables.
#
#   bash examples/quickstart.sh
#
# Needs the PostgreSQL server binaries (Debian/Ubuntu: apt-get install -y postgresql) and cargo.
# Everything lives in a temp dir that is removed at the end (KEEP=1 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> building tidemark (release)"
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/tidemark

bindir=$(pg_config --bindir 2>/dev/null || true)
[[ -x ${bindir:-}/initdb ]] || bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[[ -x ${bindir:-}/initdb ]] || { echo "no PostgreSQL server binaries: apt-get install -y postgresql"; exit 1; }
as_pg=(); [[ $(id -u) == 0 ]] && as_pg=(runuser -u postgres --)
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

W=$(mktemp -d /tmp/tidemark-quickstart.XXXXXX); chmod 755 "$W"; [[ $(id -u) == 0 ]] && chown postgres "$W"
PORT=$(free_port); HEALTH=$(free_port)
AGENT=
cleanup() {
  [[ -n $AGENT ]] && kill "$AGENT" 2>/dev/null && wait "$AGENT" 2>/dev/null
  "${as_pg[@]}" "$bindir/pg_ctl" -D "$W/data" -m immediate -w stop >/dev/null 2>&1 || true
  if [[ ${KEEP:-0} == 1 ]]; then echo "kept $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT

echo "==> starting a throwaway PostgreSQL on port $PORT"
"${as_pg[@]}" "$bindir/initdb" -D "$W/data" -U postgres -A trust --no-sync >/dev/null
printf "listen_addresses = '127.0.0.1'\nport = %s\nunix_socket_directories = '%s'\nwal_level = logical\n" "$PORT" "$W" |
  "${as_pg[@]}" tee -a "$W/data/postgresql.conf" >/dev/null
"${as_pg[@]}" "$bindir/pg_ctl" -D "$W/data" -l "$W/pg.log" -w start >/dev/null
sql() { psql -X -h 127.0.0.1 -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -qAt -d shop "$@"; }
psql -X -h 127.0.0.1 -p "$PORT" -U postgres -qAt -d postgres -c "CREATE DATABASE shop" -c "CREATE DATABASE warehouse"
sql <<'SQL'
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text);
CREATE TABLE orders (id int PRIMARY KEY, customer_id int REFERENCES customers,
                     status text NOT NULL, amount numeric(10,2), placed_at timestamptz DEFAULT now());
-- Rows that exist before tidemark starts: the initial snapshot copies them.
INSERT INTO customers VALUES (0, 'Grace', 'grace@example.com');
SQL

cat >"$W/tidemark.toml" <<TOML
[agent]
name = "shop"
data_dir = "data"
health_addr = "127.0.0.1:$HEALTH"

[source]
type = "postgres"
url = "postgres://postgres@127.0.0.1:$PORT/shop"
tables = ["public.*"]
snapshot = "initial"

[[sink]]
name = "events"
type = "jsonl"
path = "events"

[[sink]]
name = "mirror"
type = "postgres"
url = "postgres://postgres@127.0.0.1:$PORT/warehouse"
schema = "replica"
mode = "merge"

[[sink]]
name = "history"
type = "postgres"
url = "postgres://postgres@127.0.0.1:$PORT/warehouse"
schema = "history"
mode = "scd2"
TOML

echo "==> tidemark check"
"$BIN" check -c "$W/tidemark.toml"

echo "==> tidemark run"
"$BIN" run -c "$W/tidemark.toml" 2>"$W/agent.log" &
AGENT=$!
for _ in $(seq 1 100); do
  grep -q "streaming changes" "$W/agent.log" 2>/dev/null && break
  kill -0 "$AGENT" 2>/dev/null || { cat "$W/agent.log"; exit 1; }
  sleep 0.1
done
echo "    /health: $(curl -fs "http://127.0.0.1:$HEALTH/health")"

echo "==> making changes"
sql <<'SQL'
INSERT INTO customers VALUES (1, 'Ada', 'ada@example.com'), (2, 'Bob', NULL);
INSERT INTO orders (id, customer_id, status, amount) VALUES (100, 1, 'new', 19.90);
BEGIN;
UPDATE orders SET status = 'paid' WHERE id = 100;
UPDATE customers SET email = 'bob@example.com' WHERE id = 2;
COMMIT;
BEGIN; DELETE FROM customers WHERE id = 2; ROLLBACK;
DELETE FROM orders WHERE id = 100;
SQL

for _ in $(seq 1 50); do
  [[ $(cat "$W"/events/*.jsonl 2>/dev/null | wc -l) -ge 7 ]] && break
  sleep 0.1
done
echo "==> envelopes written to $W/events (one per line):"
cat "$W"/events/*.jsonl | python3 -c '
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    print(json.dumps({k: e[k] for k in ("op", "before", "after")}), " # table", e["source"]["table"], "tx", e["transaction"]["id"])
'
echo "==> the merge sink's mirror in the warehouse database (replica.customers, replica.orders):"
psql -X -h 127.0.0.1 -p "$PORT" -U postgres -q -d warehouse \
  -c "SELECT * FROM replica.customers ORDER BY id" -c "SELECT count(*) AS orders FROM replica.orders"
echo "==> the SCD2 sink's history of orders (every committed version, history.orders):"
psql -X -h 127.0.0.1 -p "$PORT" -U postgres -q -d warehouse \
  -c "SELECT id, status, _tidemark_op AS op, valid_from, valid_to, is_current FROM history.orders ORDER BY id, _tidemark_lsn"
echo "==> stopping (SIGTERM)"
kill -TERM "$AGENT"; wait "$AGENT"; AGENT=
echo "done"
