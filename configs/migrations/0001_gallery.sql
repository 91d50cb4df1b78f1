-- Gallery schema: collections of subjects, their faces (embeddings), and the
-- ordered change log that matcher replicas replay to keep their FAISS
-- indexes in step with Postgres (the source of truth).
CREATE TABLE collections (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    embedder    text NOT NULL,
    dim         integer NOT NULL CHECK (dim > 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE subjects (
    id             uuid PRIMARY KEY,
    collection_id  bigint NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    name           text NOT NULL CHECK (length(name) BETWEEN 1 AND 256),
    metadata       jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (collection_id, name)
);
CREATE INDEX subjects_page_idx ON subjects (collection_id, created_at, id);

CREATE TABLE faces (
    id             bigserial PRIMARY KEY,
    subject_id     uuid NOT NULL REFERENCES subjects(id) ON DELETE CASCADE,
    collection_id  bigint NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    -- float32 little-endian, L2-normalised; dim and model recorded beside it
    embedding      bytea NOT NULL,
    model          text NOT NULL,
    dim            integer NOT NULL,
    image_sha256   text NOT NULL,
    crop_key       text,
    box            jsonb NOT NULL,
    det_score      real NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CHECK (octet_length(embedding) = dim * 4)
);
CREATE INDEX faces_subject_idx ON faces (subject_id, id);
CREATE INDEX faces_collection_idx ON faces (collection_id, id);

-- One row per gallery change, in commit order per transaction; seq is what an
-- enrolment answer returns for read-your-writes.
CREATE TABLE changes (
    seq            bigserial PRIMARY KEY,
    collection_id  bigint NOT NULL,
    op             text NOT NULL CHECK (op IN ('add', 'remove')),
    face_id        bigint NOT NULL,
    subject_id     uuid NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
