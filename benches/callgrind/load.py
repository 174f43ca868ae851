#!/usr/bin/env python3
# load.py PORT N THREADS: N signed webhooks (distinct events) over keep-alive connections
import sys, hmac, hashlib, base64, http.client, threading, random, datetime
port, n, k = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
secret = b"bench-secret-not-for-production"
def body(r):
    return ('{"webhook_id":"evt-cg-%d","ticket_id":%d,"email":{"message_id":"<cg-%d@mail.sparkasse.example>","from":"forderungen@sparkasse.example",'
            '"subject":"Forderungsaufstellung Ihr Zeichen MP-%d","body":"Sehr geehrte Damen und Herren, die Forderung beträgt 1.234,56 €.",'
            '"received_at":"2026-11-28T09:15:00Z"},"creditor_debt":{"client_reference":"MP-%d","creditor_name":"Sparkasse KölnBonn",'
            '"creditor_reference":"K-99812","amount":"%d.%02d","currency":"EUR"}}' % (r, r % 10**9 + 1, r, r, r, r % 100000, r % 100)).encode()
base = random.randrange(10**15)
codes = {}
def worker(idx):
    c = http.client.HTTPConnection("127.0.0.1", port)
    for i in range(idx, n, k):
        b = body(base + i)
        ts = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        sig = base64.b64encode(hmac.new(secret, ts.encode() + b, hashlib.sha256).digest()).decode()
        c.request("POST", "/webhooks/email", b, {"Content-Type": "application/json",
                  "X-Zendesk-Webhook-Signature": sig, "X-Zendesk-Webhook-Signature-Timestamp": ts})
        r = c.getresponse(); r.read()
        codes[r.status] = codes.get(r.status, 0) + 1
ts = [threading.Thread(target=worker, args=(j,)) for j in range(k)]
[t.start() for t in ts]; [t.join() for t in ts]
print(codes)
