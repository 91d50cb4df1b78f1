-- The change log is pruned below what every collection's newest index
-- snapshot still needs (serve_app/gallery/gallery_index.py prune_log). The
-- highest seq ever deleted is kept here, in the pruning transaction, so a
-- replica that replays from an older position notices entries it needed
-- may be gone and reloads instead of skipping them silently (seq numbers
-- have gaps, so a gap in what it reads proves nothing).
CREATE TABLE change_log_pruned (
    only_row     boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    through_seq  bigint NOT NULL DEFAULT 0
);
INSERT INTO change_log_pruned DEFAULT VALUES;
