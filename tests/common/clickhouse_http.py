"""ClickHouse's HTTP interface in front of chdb, the ClickHouse engine as a library, for the
ClickHouse sink's tests (tests/common/clickhouse.rs starts it).

Debian packages a 2018 clickhouse-server, too old for the engine features the sink uses
(ReplacingMergeTree's is_deleted column); PyPI's chdb-core is the current engine (26.x) built
as a library, without the server. This script serves the part of the HTTP interface the sink
speaks, so every statement the sink sends runs in the real engine:

- GET /ping answers "Ok.".
- The query is the `query` parameter followed by the request body, or the body alone. An
  `INSERT ... FORMAT <format>` in the parameter with data in the body reads the data from a
  file (`FROM INFILE`), the way the server reads it from the body.
- `database`, `default_format`, the user and password (X-ClickHouse-User / X-ClickHouse-Key
  headers, Basic authorization, or `user` / `password` parameters) as the server reads them;
  any other parameter is a setting for this query alone.
- Errors as the server sends them: the exception text in the body, its code in the
  X-ClickHouse-Exception-Code header, status 401, 400, 404 or 500 by code.

One engine serves one request at a time. Usage: clickhouse_http.py DATA_DIR PASSWORD; prints
the port it listens on (127.0.0.1) as its first line of output.
"""

import base64
import http.server
import os
import re
import sys
import tempfile
import threading
import urllib.parse

from chdb import session

USER = "default"
# Parameters that are not settings.
PARAMETERS = {"query", "database", "default_format", "user", "password", "query_id"}
INSERT_WITH_DATA = re.compile(r"(?is)^\s*(INSERT\s+INTO\s+.*?)\s+FORMAT\s+(\w+)\s*$")
SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
EXCEPTION_CODE = re.compile(r"Code: (\d+)\.")
STATUS_BY_CODE = {62: 400, 60: 404, 81: 404, 192: 401, 193: 401, 194: 401, 516: 401}


class Engine:
    def __init__(self, data_dir):
        self.session = session.Session(os.path.join(data_dir, "engine"))
        self.files = os.path.join(data_dir, "bodies")
        os.makedirs(self.files, exist_ok=True)
        self.lock = threading.Lock()

    def run(self, query, body, database, output_format, settings):
        with self.lock:
            data_file = None
            insert = INSERT_WITH_DATA.match(query) if body else None
            if insert:
                handle, data_file = tempfile.mkstemp(dir=self.files)
                with os.fdopen(handle, "wb") as out:
                    out.write(body)
                query = "%s FROM INFILE '%s' FORMAT %s" % (insert.group(1), data_file, insert.group(2))
            elif body:
                query = (query + "\n" + body.decode()) if query else body.decode()
            try:
                self.session.query("USE " + quote_identifier(database or "default"))
                for name, value in settings:
                    self.session.query("SET %s = %s" % (name, quote_string(value)))
                try:
                    return self.session.query(query, output_format).bytes()
                finally:
                    for name, _ in settings:
                        self.session.query("SET %s = DEFAULT" % name)
            finally:
                if data_file:
                    os.unlink(data_file)


def quote_string(value):
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_identifier(name):
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self.handle_query()

    def do_POST(self):
        self.handle_query()

    def handle_query(self):
        url = urllib.parse.urlsplit(self.path)
        body = self.read_body()
        if url.path == "/ping":
            return self.reply(200, b"Ok.\n")
        params = urllib.parse.parse_qsl(url.query, keep_blank_values=True)
        named = dict(params)
        user, password = self.credentials(named)
        if user != USER or password != self.server.password:
            return self.fail(
                "Code: 516. DB::Exception: %s: Authentication failed: password is incorrect, "
                "or there is no user with such name. (AUTHENTICATION_FAILED)" % user
            )
        settings = [(k, v) for k, v in params if k not in PARAMETERS]
        bad = [k for k, _ in settings if not SETTING_NAME.match(k)]
        if bad:
            return self.fail("Code: 115. DB::Exception: Unknown setting %s. (UNKNOWN_SETTING)" % bad[0])
        try:
            output = self.server.engine.run(
                named.get("query", ""),
                body,
                named.get("database") or self.headers.get("X-ClickHouse-Database"),
                named.get("default_format", "TabSeparated"),
                settings,
            )
        except Exception as e:  # chdb raises its engine's exceptions as one type
            return self.fail(str(e))
        self.reply(200, output)

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()
                if size == 0:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def credentials(self, named):
        authorization = self.headers.get("Authorization", "")
        if authorization.startswith("Basic "):
            user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
            return user, password
        return (
            self.headers.get("X-ClickHouse-User") or named.get("user") or USER,
            self.headers.get("X-ClickHouse-Key") or named.get("password") or "",
        )

    def fail(self, message):
        match = EXCEPTION_CODE.search(message)
        code = int(match.group(1)) if match else 1001
        self.reply(STATUS_BY_CODE.get(code, 500), (message + "\n").encode(), code)

    def reply(self, status, body, exception_code=None):
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        if exception_code is not None:
            self.send_header("X-ClickHouse-Exception-Code", str(exception_code))
        self.end_headers()
        self.wfile.write(body)


def main():
    data_dir, password = sys.argv[1], sys.argv[2]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.engine = Engine(data_dir)
    server.password = password
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
