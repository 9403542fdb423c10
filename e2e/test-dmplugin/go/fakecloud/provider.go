package fakecloud

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Instance is one file `<provider dir>/<id>.json`. Every field is a string, so that
// the Rust side (FakeCloud in lib.rs) reads it with a tiny parser.
type Instance struct {
	ID           string `json:"id"`
	State        string `json:"state"` // a libmachine state name: Running, Stopped, ...
	IP           string `json:"ip"`
	MachineName  string `json:"machine_name"`
	InstanceType string `json:"instance_type"`
	Created      string `json:"created"` // RFC 3339
}

// errNotFound: the instance's file is gone.
var errNotFound = errors.New("instance not found")

// provider is the persistent fake cloud: a directory the tests own.
type provider struct {
	dir string
}

// openProvider checks the directory and the token: when `<dir>/token` exists, the
// driver's token must equal its content (trimmed), like an API rejecting a bad key.
func openProvider(dir, token string) (*provider, error) {
	if dir == "" {
		return nil, errors.New("fakecloud-provider-dir is not set")
	}
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return nil, fmt.Errorf("fakecloud-provider-dir %s is not a directory", dir)
	}
	want, err := os.ReadFile(filepath.Join(dir, "token"))
	if err == nil && strings.TrimSpace(string(want)) != token {
		return nil, errors.New("fakecloud: 401 Unauthorized: the token was rejected")
	}
	return &provider{dir: dir}, nil
}

func (p *provider) path(id string) string {
	return filepath.Join(p.dir, id+".json")
}

func (p *provider) get(id string) (*Instance, error) {
	if id == "" {
		return nil, errNotFound
	}
	data, err := os.ReadFile(p.path(id))
	if errors.Is(err, os.ErrNotExist) {
		return nil, errNotFound
	}
	if err != nil {
		return nil, err
	}
	var inst Instance
	if err := json.Unmarshal(data, &inst); err != nil {
		return nil, fmt.Errorf("instance %s: %v", id, err)
	}
	return &inst, nil
}

// put writes the instance atomically (a temporary file, then rename).
// byMachineName finds the newest instance launched for machineName, as cloud drivers
// that look instances up by name do.
func (p *provider) byMachineName(machineName string) (*Instance, error) {
	entries, err := os.ReadDir(p.dir)
	if err != nil {
		return nil, err
	}
	var found *Instance
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		inst, err := p.get(strings.TrimSuffix(e.Name(), ".json"))
		if err != nil || inst.MachineName != machineName {
			continue
		}
		if found == nil || inst.Created > found.Created {
			found = inst
		}
	}
	if found == nil {
		return nil, errNotFound
	}
	return found, nil
}

func (p *provider) put(inst *Instance) error {
	data, err := json.Marshal(inst)
	if err != nil {
		return err
	}
	tmp := filepath.Join(p.dir, "."+inst.ID+".tmp-"+randomHex(4))
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, p.path(inst.ID))
}

func (p *provider) delete(id string) error {
	err := os.Remove(p.path(id))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}
