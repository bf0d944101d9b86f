package schema

import (
	"crypto/sha256"
	"encoding/hex"
	"io/fs"
	"sort"

	"github.com/riverqueue/river/riverdriver/riverpgxv5"
)

func fingerprint(fsys fs.FS) (string, error) {
	h := sha256.New()
	var names []string
	if err := fs.WalkDir(fsys, ".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			names = append(names, path)
		}
		return nil
	}); err != nil {
		return "", err
	}
	sort.Strings(names)
	for _, name := range names {
		b, err := fs.ReadFile(fsys, name)
		if err != nil {
			return "", err
		}
		h.Write([]byte(name))
		h.Write(b)
	}
	// River's migrations are part of the schema too; their count changes with River's version.
	var driver riverpgxv5.Driver
	for _, line := range driver.GetMigrationLines() {
		h.Write([]byte(line))
		_ = fs.WalkDir(driver.GetMigrationFS(line), ".", func(path string, d fs.DirEntry, err error) error {
			if err == nil && !d.IsDir() {
				h.Write([]byte(path))
			}
			return nil
		})
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}
