"""The lab's servers, run inside the ``lab-world`` namespace (tests/netlab.py): HTTP on 80
and 8080 on every address of the world (both families), and an authoritative-style DNS
server for the lab's names on port 53 (UDP and TCP). Prints "ready" once all listen."""

from __future__ import annotations

import http.server
import socket
import socketserver
import threading

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from tests.netlab import BODY, NAMES


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/bytes/"):  # throughput: /bytes/N streams N zero bytes
            size = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = bytes(65536)
            while size > 0:
                self.wfile.write(chunk[:size])
                size -= len(chunk)
            return
        host = self.connection.getsockname()[0]
        body = (BODY if self.path == "/hello" else f"{host} {self.path}\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class DualStack(socketserver.ThreadingMixIn, http.server.HTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def answer(wire: bytes) -> bytes:
    query = dns.message.from_wire(wire)
    response = dns.message.make_response(query)
    question = query.question[0]
    name = question.name.to_text(omit_final_dot=True).lower()
    if name not in NAMES:
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()
    want = "A" if question.rdtype == dns.rdatatype.A else "AAAA"
    found = [a for a in NAMES[name] if (":" in a) == (want == "AAAA")]
    if found:
        response.answer.append(dns.rrset.from_text(question.name, 300, "IN", want, *found))
    return response.to_wire()


def serve_udp(sock: socket.socket) -> None:
    while True:
        wire, client = sock.recvfrom(4096)
        sock.sendto(answer(wire), client)


def serve_tcp(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        with conn:
            size = int.from_bytes(conn.recv(2), "big")
            reply = answer(conn.recv(size))
            conn.sendall(len(reply).to_bytes(2, "big") + reply)


def main() -> None:
    for port in (80, 8080):
        server = DualStack(("::", port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    for kind, serve in ((socket.SOCK_DGRAM, serve_udp), (socket.SOCK_STREAM, serve_tcp)):
        sock = socket.socket(socket.AF_INET6, kind)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 53))
        if kind == socket.SOCK_STREAM:
            sock.listen(16)
        threading.Thread(target=serve, args=(sock,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
