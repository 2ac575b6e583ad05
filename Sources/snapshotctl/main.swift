print("snapshotd")
