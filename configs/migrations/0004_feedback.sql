-- "Not this person": a probe embedding that was wrongly matched to a subject.
-- Later identifies whose probe is close to one of these do not decide for
-- that subject. Erasing the subject erases its feedback (ON DELETE CASCADE).
CREATE TABLE feedback (
    id             bigserial PRIMARY KEY,
    collection_id  bigint NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    subject_id     uuid NOT NULL REFERENCES subjects(id) ON DELETE CASCADE,
    embedding      bytea NOT NULL,
    model          text NOT NULL,
    source         text NOT NULL,           -- "image" or "trace:<trace id>#<face>"
    actor          text NOT NULL DEFAULT '',
    note           text NOT NULL DEFAULT '' CHECK (length(note) <= 1000),
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX feedback_subject_idx ON feedback (subject_id);
