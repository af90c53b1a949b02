#!/usr/bin/env python3
"""A KV-events subscriber, as a router would run one: Debian's pyzmq and msgpack.

Subscribes to the manager's PUB socket, asks its ROUTER socket for the batches
it missed (a late subscriber), and once told the last sequence number on stdin
(one line), fills any gap by replay, checks every payload, and rebuilds the set
of cached block hashes per medium from the events alone. Writes to --out:

    device <hash>        one line per cached hash (decimal), likewise "host"
    stat <name> <value>  batches, live, replayed, salt_hits, first_live

Checks (exit status 1 with a message on stderr when one fails): the topic
frame; 8-byte big-endian sequence numbers; live sequence numbers contiguous
from the first one received; a batch seen both live and by replay has identical payloads; every
number from 0 to the last is received; each payload's layout is vLLM's
([ts, events, data_parallel_rank], events tagged "BlockStored" /
"BlockRemoved" / "AllBlocksCleared" with their fields in vLLM's order); a
stored hash is not already held and a removed one is held, per medium.
"""

import argparse
import sys
import time

import msgpack
import zmq

END = (-1).to_bytes(8, "big", signed=True)
MEDIA = {"GPU": "device", "CPU": "host"}


def fail(message):
    sys.stderr.write("subscriber: %s\n" % message)
    sys.exit(1)


class Subscriber:
    def __init__(self, args):
        self.args = args
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, args.topic.encode())
        self.sub.setsockopt(zmq.RCVHWM, 0)  # Never drop: gaps must be ours.
        self.sub.connect(args.pub)
        self.replay = self.ctx.socket(zmq.DEALER)
        self.replay.connect(args.replay)
        self.payloads = {}  # sequence -> payload
        self.live = 0
        self.replayed = 0
        self.last_live = -1
        self.first_live = -1

    def keep(self, seq, payload, source):
        old = self.payloads.get(seq)
        if old is not None and old != payload:
            fail("batch %d differs between live and replay" % seq)
        self.payloads[seq] = payload

    def on_live(self):
        frames = self.sub.recv_multipart()
        if len(frames) != 3:
            fail("a live message of %d frames" % len(frames))
        topic, seq_bytes, payload = frames
        if topic != self.args.topic.encode():
            fail("topic %r" % topic)
        if len(seq_bytes) != 8:
            fail("a sequence frame of %d bytes" % len(seq_bytes))
        seq = int.from_bytes(seq_bytes, "big")
        if self.last_live >= 0 and seq != self.last_live + 1:
            fail("live batch %d after %d: not contiguous" %
                 (seq, self.last_live))
        if self.first_live < 0:
            self.first_live = seq
        self.last_live = seq
        self.live += 1
        self.keep(seq, payload, "live")

    def request_replay(self, start):
        # A malformed request first: the server must ignore it and answer on.
        self.replay.send_multipart([b"", b"bad"])
        self.replay.send_multipart([b"", start.to_bytes(8, "big")])
        deadline = time.time() + 30
        while True:
            if not self.replay.poll(int(max(0, deadline - time.time()) * 1000)):
                fail("no replay answer for start %d" % start)
            frames = self.replay.recv_multipart()
            if len(frames) != 3 or frames[0] != b"":
                fail("a replay reply of %d frames" % len(frames))
            if frames[1] == END:
                if frames[2] != b"":
                    fail("end marker with a payload")
                return
            seq = int.from_bytes(frames[1], "big")
            if seq < start:
                fail("replay of %d for start %d" % (seq, start))
            self.replayed += 1
            self.keep(seq, frames[2], "replay")

    def run(self):
        # Late: whatever was published before we came.
        self.request_replay(0)
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        poller.register(sys.stdin.fileno(), zmq.POLLIN)
        last = None
        deadline = time.time() + 120
        while last is None:
            if time.time() > deadline:
                fail("never told the last sequence number")
            for sock, _ in poller.poll(100):
                if sock is self.sub:
                    self.on_live()
                else:
                    line = sys.stdin.readline()
                    if not line:
                        fail("stdin closed before the last sequence number")
                    last = int(line)
        # Everything up to `last`: live stragglers, then replay for any gap.
        for _ in range(50):
            while self.sub.poll(50):
                self.on_live()
            missing = [s for s in range(last + 1) if s not in self.payloads]
            if not missing:
                break
            self.request_replay(missing[0])
        else:
            fail("batches still missing: %s" % missing[:10])
        return last

    def rebuild(self, last):
        sets = {"device": set(), "host": set()}
        salt = bytes.fromhex(self.args.salt_hex)
        salt_hits = 0
        for seq in range(last + 1):
            payload = self.payloads[seq]
            if salt and salt in payload:
                salt_hits += 1
            batch = msgpack.unpackb(payload, raw=False)
            if not (isinstance(batch, list) and len(batch) == 3):
                fail("batch %d is not [ts, events, dp_rank]" % seq)
            ts, events, rank = batch
            if not isinstance(ts, float) or rank != self.args.rank:
                fail("batch %d: ts %r rank %r" % (seq, ts, rank))
            if not events:
                fail("batch %d has no events" % seq)
            for e in events:
                self.apply(seq, e, sets)
        return sets, salt_hits

    def apply(self, seq, e, sets):
        tag = e[0]
        if tag == "BlockStored":
            if len(e) != 7:
                fail("batch %d: BlockStored of %d fields" % (seq, len(e)))
            _, hashes, parent, tokens, block_size, lora, medium = e
            if parent is not None and not isinstance(parent, int):
                fail("batch %d: parent %r" % (seq, parent))
            if block_size != self.args.block_size or \
                    len(tokens) != block_size * len(hashes) or not hashes:
                fail("batch %d: %d hashes, %d tokens, block_size %r" %
                     (seq, len(hashes), len(tokens), block_size))
            if lora is not None and not isinstance(lora, int):
                fail("batch %d: lora_id %r" % (seq, lora))
            held = sets[MEDIA[medium]]
            for h in hashes:
                if h in held:
                    fail("batch %d: %d stored twice" % (seq, h))
                held.add(h)
        elif tag == "BlockRemoved":
            if len(e) != 3:
                fail("batch %d: BlockRemoved of %d fields" % (seq, len(e)))
            held = sets[MEDIA[e[2]]]
            for h in e[1]:
                if h not in held:
                    fail("batch %d: %d removed, not held" % (seq, h))
                held.remove(h)
        elif tag == "AllBlocksCleared":
            if len(e) != 1:
                fail("batch %d: AllBlocksCleared of %d fields" % (seq, len(e)))
            for held in sets.values():
                held.clear()
        else:
            fail("batch %d: unknown event %r" % (seq, tag))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pub", required=True)
    p.add_argument("--replay", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--salt_hex", default="")
    p.add_argument("--block_size", type=int, required=True)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    s = Subscriber(args)
    last = s.run()
    sets, salt_hits = s.rebuild(last)
    with open(args.out, "w") as f:
        for medium in ("device", "host"):
            for h in sorted(sets[medium]):
                f.write("%s %d\n" % (medium, h))
        f.write("stat batches %d\n" % (last + 1))
        f.write("stat live %d\n" % s.live)
        f.write("stat replayed %d\n" % s.replayed)
        f.write("stat salt_hits %d\n" % salt_hits)
        f.write("stat first_live %d\n" % s.first_live)
    s.sub.close(0)
    s.replay.close(0)
    s.ctx.term()


if __name__ == "__main__":
    main()
