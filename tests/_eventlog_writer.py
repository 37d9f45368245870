"""A child process for the durability tests: appends feedback batches to an EventLog and prints
each batch's event ids only after `append` acknowledged them (fsync'ed); the parent SIGKILLs it.

    python _eventlog_writer.py <uri> <staging_dir> <batch_size>
"""

from __future__ import annotations

import sys
import time

from cotrr_ray.experiments.eventlog import EventLog
from cotrr_ray.experiments.events import feedback_record


def main() -> None:
    uri, staging, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # A huge age and size: nothing is rotated or uploaded, so on S3 all of it stays staged.
    log = EventLog(uri, staging_dir=staging, max_segment_bytes=1 << 30, max_segment_age_s=86_400)
    i = 0
    while True:
        now = time.time()
        ids = [f"k{i + j}" for j in range(batch)]
        recs = [
            feedback_record(
                {
                    "event_id": e,
                    "request_id": f"r{e}",
                    "item_id": "x",
                    "type": "click",
                    "timestamp": now,
                    "value": None,
                },
                received_at=now,
                replica=log.writer_id,
            )
            for e in ids
        ]
        log.append("feedback", recs).result()
        print(" ".join(ids), flush=True)  # the acknowledgement: only after the fsync
        i += batch


if __name__ == "__main__":
    main()
