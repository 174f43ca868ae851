-- A pending backlog of :n rows, one aggregate per row, shaped like ingest's (for run.sh).
INSERT INTO incoming_emails (id, webhook_id, ticket_id, message_id, from_address, subject, body, received_at)
 SELECT i, 'evt-backlog-' || i, 100000 + i, '<backlog-' || i || '@mail.sparkasse.example>',
        'forderungen@sparkasse.example', 'Forderungsaufstellung Ihr Zeichen MP-B' || i,
        'Sehr geehrte Damen und Herren, die Forderung beträgt 1.234,56 €.', '2026-11-28T09:15:00Z'
 FROM generate_series(1, :n) AS i;
INSERT INTO outbox_messages (id, operation, aggregate_id, payload, email_id, idempotency_key)
 SELECT i, 'update_creditor_debt', 'MP-B' || i || '/K-' || i,
        jsonb_build_object('client_reference', 'MP-B' || i, 'creditor_name', 'Sparkasse KölnBonn',
                           'amount', (i % 100000) || '.' || lpad((i % 100)::text, 2, '0'),
                           'currency', 'EUR', 'creditor_reference', 'K-' || i),
        i, 'update_creditor_debt:MP-B' || i || '/K-' || i || ':' || substr(md5(i::text), 1, 16)
 FROM generate_series(1, :n) AS i;
SELECT setval('incoming_emails_id_seq', :n); SELECT setval('outbox_messages_id_seq', :n);
VACUUM ANALYZE incoming_emails; VACUUM ANALYZE outbox_messages;
