"""The embedded default database, and the CLI's folder enrolment against the live app."""
from __future__ import annotations

import shutil
from pathlib import Path


from serve_app.cli import main as cli_main
from serve_app.embedded_pg import start_embedded_postgres, stop_embedded_postgres
from serve_app.gallery.repository import GalleryRepository, create_pool
from tests.conftest import people
from tests.integration.conftest import BOOTSTRAP_KEY, LiveApp


async def test_embedded_postgres_starts_migrates_and_keeps_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    uri = start_embedded_postgres(data_dir)
    try:
        pool = await create_pool(uri, min_size=1, max_size=2)
        repo = GalleryRepository(pool)
        col = await repo.ensure_collection("default", "sface", 128)
        await repo.create_subject(col, "kept")
        await pool.close()
        assert stop_embedded_postgres(data_dir)
        # started again over the same data directory: the gallery is still there
        uri = start_embedded_postgres(data_dir)
        pool = await create_pool(uri, min_size=1, max_size=2)
        repo = GalleryRepository(pool)
        col = await repo.ensure_collection("default", "sface", 128)
        assert await repo.find_subject_by_name(col, "kept") is not None
        await pool.close()
    finally:
        stop_embedded_postgres(data_dir)
    assert not stop_embedded_postgres(data_dir)  # nothing left running


def test_cli_enrolls_a_folder_through_the_api(live_app: LiveApp, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "photos"
    chosen = {"alex_lacamoire": "cli-alex", "rose_leslie": "cli-rose"}
    for person, alias in chosen.items():
        (folder / alias).mkdir(parents=True)
        for photo in people()[person]:
            shutil.copy(photo, folder / alias / photo.name)
    (folder / "cli-rose" / "notes.txt").write_text("not an image, skipped")
    assert cli_main(["enroll-folder", str(folder), "--url", live_app.url, "--api-key", BOOTSTRAP_KEY]) == 0
    assert "enrolled 4 of 4 photos for 2 subjects" in capsys.readouterr().out
    # running it again adds faces to the same subjects instead of failing
    assert cli_main(["enroll-folder", str(folder), "--url", live_app.url, "--api-key", BOOTSTRAP_KEY]) == 0
    with live_app.client() as client:
        for alias in chosen.values():
            found = client.get("/v1/subjects", params={"name": alias}).json()["subjects"]
            assert len(found) == 1 and found[0]["face_count"] == 4
            client.delete(f"/v1/subjects/{found[0]['id']}")
