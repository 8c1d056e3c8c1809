"""Draw the commit-to-queryable latency histogram of the CDC benchmark as a PNG.

Usage: python3 benches/latency_png.py bench-data/cdc-latencies.txt bench-latency.png

Reads one latency in milliseconds per line. Standard library only (zlib + struct): bars of
50 ms buckets, p50/p95/p99 marked as vertical lines (blue, orange, red), a light grid every
250 ms and every 10% of the tallest bar. Axis labels are in the report beside the image.
"""
import struct
import sys
import zlib

W, H, M = 800, 400, 40  # size and margin in pixels
BUCKET_MS = 50


def png(path, pixels):
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))


def main():
    values = sorted(float(line) for line in open(sys.argv[1]) if line.strip())
    if not values:
        sys.exit("no latencies")
    top = max(values)
    buckets = [0] * (int(top // BUCKET_MS) + 1)
    for v in values:
        buckets[int(v // BUCKET_MS)] += 1
    tallest = max(buckets)
    span_ms = len(buckets) * BUCKET_MS
    pixels = [[255] * (W * 3) for _ in range(H)]

    def put(x, y, rgb):
        if 0 <= x < W and 0 <= y < H:
            pixels[y][3 * x:3 * x + 3] = rgb

    plot_w, plot_h = W - 2 * M, H - 2 * M
    x_of = lambda ms: M + int(ms / span_ms * plot_w)
    for ms in range(0, span_ms + 1, 250):
        for y in range(M, H - M):
            put(x_of(ms), y, (225, 225, 225))
    for i in range(11):
        y = H - M - int(i / 10 * plot_h)
        for x in range(M, W - M):
            put(x, y, (225, 225, 225))
    for i, count in enumerate(buckets):
        x0, x1 = x_of(i * BUCKET_MS) + 1, x_of((i + 1) * BUCKET_MS) - 1
        height = int(count / tallest * plot_h)
        for y in range(H - M - height, H - M):
            for x in range(x0, x1 + 1):
                put(x, y, (60, 120, 60))
    for p, rgb in ((0.5, (30, 80, 220)), (0.95, (240, 140, 0)), (0.99, (220, 30, 30))):
        ms = values[round((len(values) - 1) * p)]
        for y in range(M, H - M):
            put(x_of(ms), y, rgb)
            put(x_of(ms) + 1, y, rgb)
    for x in range(M, W - M):
        put(x, H - M, (0, 0, 0))
    for y in range(M, H - M + 1):
        put(M, y, (0, 0, 0))
    png(sys.argv[2], pixels)
    print(f"{len(values)} latencies, 0-{span_ms} ms in {BUCKET_MS} ms buckets, tallest {tallest} -> {sys.argv[2]}")


if __name__ == "__main__":
    main()
