-- The change log also carries what identify answers besides the index:
-- 'rename' (a subject's name changed; face_id 0) and 'feedback' (its "not
-- this person" probes changed; face_id = the feedback row). Matcher replicas
-- keep names and probes in memory from these, so identify needs no database
-- read and keeps answering while Postgres is down.
ALTER TABLE changes DROP CONSTRAINT changes_op_check;
ALTER TABLE changes ADD CONSTRAINT changes_op_check CHECK (op IN ('add', 'remove', 'rename', 'feedback'));
