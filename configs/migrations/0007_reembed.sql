-- Re-embedding a collection with another model (serve_app/jobs/reembed.py).
-- The new vectors are built aside, one per face, in staged_embeddings while
-- the collection keeps answering from the old ones; each staged batch is a
-- 'stage' entry in the change log, so matchers build the new index beside
-- the live one. 'switch' is one transaction that moves the staged vectors
-- into faces and the collection to the new model; a matcher swaps the
-- prebuilt index in at that entry, so a search sees the old index or the new
-- one, never a mix. 'unstage' drops an abandoned staging. Entries name the
-- collection (collection_id) and, for 'stage', the face (face_id).
ALTER TABLE changes DROP CONSTRAINT changes_op_check;
ALTER TABLE changes ADD CONSTRAINT changes_op_check
    CHECK (op IN ('add', 'remove', 'rename', 'feedback', 'stage', 'unstage', 'switch'));
-- Every switch, kept apart from the log (which may be pruned): a matcher
-- restoring an index snapshot needs each collection's last switch (an older
-- snapshot holds the old model's vectors).
CREATE TABLE collection_switches (
    collection_id  bigint NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    seq            bigint NOT NULL,
    model          text NOT NULL,
    from_model     text NOT NULL,
    switched_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (collection_id, seq)
);

-- At most one re-embed per collection at a time.
CREATE TABLE reembeds (
    collection_id  bigint PRIMARY KEY REFERENCES collections(id) ON DELETE CASCADE,
    model          text NOT NULL,
    dim            integer NOT NULL CHECK (dim > 0),
    from_model     text NOT NULL,
    started_at     timestamptz NOT NULL DEFAULT now()
);

-- A face's vector under the new model. Deleting the face (or its subject, or
-- the collection) deletes it too: erasure needs nothing of its own here, and
-- the face's 'remove' entry tells matchers to drop it from the staged index.
CREATE TABLE staged_embeddings (
    face_id        bigint PRIMARY KEY REFERENCES faces(id) ON DELETE CASCADE,
    collection_id  bigint NOT NULL REFERENCES reembeds(collection_id) ON DELETE CASCADE,
    embedding      bytea NOT NULL
);
CREATE INDEX staged_embeddings_collection_idx ON staged_embeddings (collection_id, face_id);

-- One model per collection, where no race can break it: a face's model and
-- dim are its collection's. A writer still holding a collection looked up
-- before its switch (an ingress's cache, a bulk job) gets a
-- serialization_failure to retry on, instead of putting an old-model vector
-- into the new index.
CREATE FUNCTION faces_model_is_collections() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    want_model text;
    want_dim   integer;
BEGIN
    SELECT embedder, dim INTO want_model, want_dim FROM collections WHERE id = NEW.collection_id;
    IF FOUND AND (want_model IS DISTINCT FROM NEW.model OR want_dim IS DISTINCT FROM NEW.dim) THEN
        RAISE EXCEPTION 'collection % holds % embeddings (%-d), not % (%-d)',
            NEW.collection_id, want_model, want_dim, NEW.model, NEW.dim
            USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER faces_model_is_collections BEFORE INSERT OR UPDATE OF model, dim, collection_id ON faces
    FOR EACH ROW EXECUTE FUNCTION faces_model_is_collections();

-- The same for "not this person" probes: compared with the collection's vectors.
CREATE FUNCTION feedback_model_is_collections() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    want_model text;
BEGIN
    SELECT embedder INTO want_model FROM collections WHERE id = NEW.collection_id;
    IF FOUND AND want_model IS DISTINCT FROM NEW.model THEN
        RAISE EXCEPTION 'collection % holds % embeddings, not %', NEW.collection_id, want_model, NEW.model
            USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER feedback_model_is_collections BEFORE INSERT OR UPDATE OF model, collection_id ON feedback
    FOR EACH ROW EXECUTE FUNCTION feedback_model_is_collections();
