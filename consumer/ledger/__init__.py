"""The conversion ledger: a compacted topic of what was sent for each conversion key, where, when and with what answer.

Partitioned like the source topic: the record of an event read from source partition p goes to ledger
partition p, so a member that is assigned p reads only ledger partition p to learn what it need not send
again (recovery.py). Keyed by the conversion's idempotency key, so compaction keeps its latest outcome.

Roles, one module each:

* `record`   — LedgerRecord, its keys and its Avro encoding (schemas/ledger_record.avsc); pure.
* `marks`    — per source partition, the ledger offset a commit's metadata must carry; pure.
* `writer`   — LedgerWriter: an idempotent acks=all producer; a write resolves when the broker acked all.
* `recovery` — what was delivered since a partition's committed offset: a bounded read of its ledger partition.
* `topic`    — the ledger topic checked (or created) at start: compacted, as many partitions as the source.
* `pipeline` — PipelineLedger: the small surface a provider pipeline calls (record, metadata, recover).
* `report`, `verify`, `forget` — the command-line tools reading it.

The guarantee, and its bound, are in docs/operations.md, "The ledger".
"""
