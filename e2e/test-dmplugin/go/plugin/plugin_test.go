package plugin

import (
	"bufio"
	"bytes"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/rpc"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"machinist.dev/fakecloud/fakecloud"
	"machinist.dev/fakecloud/mcnflag"
	"machinist.dev/fakecloud/rpcdriver"
)

// The test binary doubles as the plugin: the process tests start it again with
// FAKECLOUD_TEST_BE_PLUGIN=1.
func TestMain(m *testing.M) {
	if os.Getenv("FAKECLOUD_TEST_BE_PLUGIN") == "1" {
		Main()
	}
	os.Exit(m.Run())
}

// client calls like libmachine's InternalClient.
type client struct {
	t *testing.T
	c *rpc.Client
}

var empty = struct{}{}

func (c client) call(method string, args, reply interface{}) error {
	return c.c.Call(rpcdriver.ServiceNameV1+"."+method, args, reply)
}

func (c client) must(method string, args, reply interface{}) {
	c.t.Helper()
	if err := c.call(method, args, reply); err != nil {
		c.t.Fatalf("%s: %v", method, err)
	}
}

func (c client) state() int {
	c.t.Helper()
	var s int
	c.must("GetState", empty, &s)
	return s
}

func (c client) str(method string) string {
	c.t.Helper()
	var s string
	c.must(method, empty, &s)
	return s
}

// inProcess serves a fresh driver on a loopback port, as the plugin does.
func inProcess(t *testing.T) (client, *rpcdriver.RPCServerDriver) {
	d := rpcdriver.NewRPCServerDriver(fakecloud.NewDriver())
	srv := rpc.NewServer()
	for _, name := range []string{rpcdriver.ServiceNameV0, rpcdriver.ServiceNameV1} {
		if err := srv.RegisterName(name, d); err != nil {
			t.Fatal(err)
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = http.Serve(l, srv) }()
	done := make(chan struct{})
	go func() {
		for {
			select {
			case <-d.HeartbeatCh:
			case <-d.CloseCh:
			case <-done:
				return
			}
		}
	}()
	c, err := rpc.DialHTTP("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); l.Close(); close(done) })
	return client{t, c}, d
}

// driverOpts is what docker-machine's getDriverOpts sends: every flag's default
// (false for a BoolFlag), overlaid with the user's values, in an RPCFlags held by a
// DriverOptions interface.
func driverOpts(flags []mcnflag.Flag, values map[string]interface{}) rpcdriver.DriverOptions {
	opts := rpcdriver.RPCFlags{Values: map[string]interface{}{}}
	for _, f := range flags {
		opts.Values[f.String()] = f.Default()
		if f.Default() == nil {
			opts.Values[f.String()] = false
		}
	}
	for k, v := range values {
		opts.Values[k] = v
	}
	return opts
}

// machine configures a driver for machine m1 in a new store (with its machine
// directory when mkdir) and provider, with extra flag values.
func machine(t *testing.T, c client, mkdir bool, values map[string]interface{}) (store, provider string) {
	t.Helper()
	store, provider = t.TempDir(), t.TempDir()
	if mkdir {
		if err := os.MkdirAll(filepath.Join(store, "machines", "m1"), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	c.must("SetConfigRaw", []byte(fmt.Sprintf(`{"MachineName":"m1","StorePath":%q}`, store)), nil)
	var flags []mcnflag.Flag
	c.must("GetCreateFlags", empty, &flags)
	all := map[string]interface{}{"fakecloud-token": "s3cret", "fakecloud-provider-dir": provider}
	for k, v := range values {
		all[k] = v
	}
	opts := driverOpts(flags, all)
	c.must("SetConfigFromFlags", &opts, nil)
	return store, provider
}

func instances(t *testing.T, provider string) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(provider, "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	return files
}

func TestLifecycle(t *testing.T) {
	c, _ := inProcess(t)
	var version int
	c.must("GetVersion", empty, &version)
	if version != 1 {
		t.Fatalf("GetVersion = %d", version)
	}

	var flags []mcnflag.Flag
	c.must("GetCreateFlags", empty, &flags)
	if len(flags) != len(fakecloud.CreateFlags()) {
		t.Fatalf("%d flags", len(flags))
	}
	for _, f := range flags {
		switch f.(type) {
		case *mcnflag.StringFlag, *mcnflag.StringSliceFlag, *mcnflag.IntFlag, *mcnflag.BoolFlag:
		default:
			t.Fatalf("flag %s arrives as %T, docker-machine expects pointers", f, f)
		}
	}

	store := t.TempDir()
	provider := t.TempDir()
	c.must("SetConfigRaw", []byte(fmt.Sprintf(`{"MachineName":"m1","StorePath":%q}`, store)), nil)
	if got := c.str("GetMachineName"); got != "m1" {
		t.Fatalf("GetMachineName = %q", got)
	}
	noToken := driverOpts(flags, map[string]interface{}{"fakecloud-provider-dir": provider})
	c.must("SetConfigFromFlags", &noToken, nil)
	if err := c.call("PreCreateCheck", empty, nil); err == nil || err.Error() != "fakecloud-token is required" {
		t.Fatalf("PreCreateCheck without a token: %v", err)
	}
	opts := driverOpts(flags, map[string]interface{}{"fakecloud-token": "s3cret", "fakecloud-provider-dir": provider, "fakecloud-tags": []string{"a=b"}})
	c.must("SetConfigFromFlags", &opts, nil)
	c.must("PreCreateCheck", empty, nil)

	err := c.call("Create", empty, nil)
	if err == nil || !strings.HasPrefix(err.Error(), "unable to create key pair: Error writing keys to file(s)") {
		t.Fatalf("Create without the machine directory: %v", err)
	}
	if n := len(instances(t, provider)); n != 0 {
		t.Fatalf("%d instances after the failed Create", n)
	}
	if err := os.MkdirAll(filepath.Join(store, "machines", "m1"), 0o700); err != nil {
		t.Fatal(err)
	}
	c.must("Create", empty, nil)
	if n := len(instances(t, provider)); n != 1 {
		t.Fatalf("%d instances after Create", n)
	}

	var raw []byte
	c.must("GetConfigRaw", empty, &raw)
	var config map[string]interface{}
	if err := json.Unmarshal(raw, &config); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"IPAddress", "MachineName", "SSHUser", "SSHPort", "SSHKeyPath", "StorePath", "SwarmMaster", "SwarmHost", "SwarmDiscovery", "InstanceID", "Token"} {
		if _, ok := config[k]; !ok {
			t.Errorf("GetConfigRaw has no %s: %s", k, raw)
		}
	}
	if config["Token"] != "s3cret" || !strings.HasPrefix(config["InstanceID"].(string), "fc-") || config["IPAddress"] != "127.0.0.1" {
		t.Fatalf("GetConfigRaw: %s", raw)
	}

	if s := c.state(); s != 1 {
		t.Fatalf("GetState = %d", s)
	}
	for method, want := range map[string]string{
		"DriverName":     "fakecloud",
		"GetIP":          "127.0.0.1",
		"GetSSHHostname": "127.0.0.1",
		"GetURL":         "tcp://127.0.0.1:2376",
		"GetSSHUsername": "root",
		"GetSSHKeyPath":  filepath.Join(store, "machines", "m1", "id_rsa"),
	} {
		if got := c.str(method); got != want {
			t.Errorf("%s = %q, want %q", method, got, want)
		}
	}
	var port int
	c.must("GetSSHPort", empty, &port)
	if port != 22 {
		t.Fatalf("GetSSHPort = %d", port)
	}
	if err := c.call("GetIPv6", empty, new(string)); err == nil {
		t.Fatal("GetIPv6 answered an address")
	}
	checkKey(t, filepath.Join(store, "machines", "m1", "id_rsa"))

	// A fresh process given only the saved JSON sees the instance.
	fresh, _ := inProcess(t)
	fresh.must("SetConfigRaw", raw, nil)
	for _, step := range []struct {
		method string
		want   int
	}{{"Stop", 4}, {"Start", 1}, {"Kill", 4}, {"Restart", 1}} {
		fresh.must(step.method, empty, nil)
		if s := fresh.state(); s != step.want {
			t.Fatalf("GetState after %s = %d", step.method, s)
		}
	}
	fresh.must("Remove", empty, nil)
	if s := fresh.state(); s != 7 {
		t.Fatalf("GetState after Remove = %d", s)
	}
	fresh.must("Remove", empty, nil)
	if err := fresh.call("GetIP", empty, new(string)); err == nil || err.Error() != "IP address is not set" {
		t.Fatalf("GetIP after Remove: %v", err)
	}
	if err := fresh.call("Start", empty, nil); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Fatalf("Start after Remove: %v", err)
	}
	if n := len(instances(t, provider)); n != 0 {
		t.Fatalf("%d instances after Remove", n)
	}

	// The old service name, and an unknown method.
	if err := c.c.Call(rpcdriver.ServiceNameV0+".GetVersion", empty, &version); err != nil {
		t.Fatal(err)
	}
	if err := c.call("Nope", empty, nil); err == nil || err.Error() != "rpc: can't find method RPCServerDriver.Nope" {
		t.Fatalf("unknown method: %v", err)
	}
}

func checkKey(t *testing.T, path string) {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("%s has mode %v", path, st.Mode())
	}
	data, _ := os.ReadFile(path)
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "RSA PRIVATE KEY" {
		t.Fatalf("%s is not an RSA PRIVATE KEY PEM", path)
	}
	key, err := x509.ParsePKCS1PrivateKey(block.Bytes)
	if err != nil || key.N.BitLen() != 2048 {
		t.Fatalf("%s: %v", path, err)
	}
	pub, err := os.ReadFile(path + ".pub")
	if err != nil || !strings.HasPrefix(string(pub), "ssh-rsa ") {
		t.Fatalf("%s.pub: %q %v", path, pub, err)
	}
	// OpenSSH derives the same public key from the private one.
	if keygen, err := exec.LookPath("ssh-keygen"); err == nil {
		out, err := exec.Command(keygen, "-y", "-f", path).Output()
		if err != nil {
			t.Fatalf("ssh-keygen -y: %v", err)
		}
		if strings.Fields(string(out))[1] != strings.Fields(string(pub))[1] {
			t.Fatalf("ssh-keygen -y gives %q, id_rsa.pub holds %q", out, pub)
		}
	}
}

func TestFaults(t *testing.T) {
	c, d := inProcess(t)
	home := t.TempDir()
	authorized := filepath.Join(home, ".ssh", "authorized_keys")
	store, provider := machine(t, c, true, map[string]interface{}{
		"fakecloud-fail":                 []string{"GetIP=boom: quota exceeded"},
		"fakecloud-slow":                 []string{"GetState=300"},
		"fakecloud-hang":                 []string{"GetURL"},
		"fakecloud-authorized-keys-file": authorized,
	})
	c.must("Create", empty, nil)
	pub, _ := os.ReadFile(filepath.Join(store, "machines", "m1", "id_rsa.pub"))
	if got, _ := os.ReadFile(authorized); !bytes.Equal(got, pub) {
		t.Fatalf("authorized_keys holds %q, want %q", got, pub)
	}
	if err := c.call("GetIP", empty, new(string)); err == nil || err.Error() != "boom: quota exceeded" {
		t.Fatalf("GetIP: %v", err)
	}
	start := time.Now()
	if s := c.state(); s != 1 || time.Since(start) < 300*time.Millisecond {
		t.Fatalf("slow GetState = %d after %s", s, time.Since(start))
	}
	hung := c.c.Go(rpcdriver.ServiceNameV1+".GetURL", empty, new(string), nil)
	select {
	case <-hung.Done:
		t.Fatalf("GetURL returned: %v", hung.Error)
	case <-time.After(300 * time.Millisecond):
	}
	if got := c.str("GetMachineName"); got != "m1" {
		t.Fatalf("GetMachineName during a hung call = %q", got)
	}

	// The provider rejects a wrong token.
	if err := os.WriteFile(filepath.Join(provider, "token"), []byte("other\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := c.call("GetState", empty, new(int)); err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("GetState with a rejected token: %v", err)
	}

	// A panic in Create comes back as an error.
	machine(t, c, true, map[string]interface{}{"fakecloud-panic": []string{"Create=kaboom"}})
	if err := c.call("Create", empty, nil); err == nil || !strings.HasPrefix(err.Error(), "Panic in the driver: kaboom\n") {
		t.Fatalf("Create with a panic: %v", err)
	}
	bad := driverOpts(fakecloud.CreateFlags(), map[string]interface{}{"fakecloud-slow": []string{"Create"}})
	if err := c.call("SetConfigFromFlags", &bad, nil); err == nil {
		t.Fatal("a bad fakecloud-slow entry was accepted")
	}

	// A missing method answers exactly as net/rpc does for an unknown one.
	d.Missing["GetIPv6"] = true
	if err := c.call("GetIPv6", empty, new(string)); err == nil || err.Error() != "rpc: can't find method RPCServerDriver.GetIPv6" {
		t.Fatalf("missing GetIPv6: %v", err)
	}

}

// process is the plugin running in a child process.
type process struct {
	cmd    *exec.Cmd
	stderr *bytes.Buffer
	addr   string
	exited chan error
}

func startProcess(t *testing.T, env ...string) *process {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "FAKECLOUD_TEST_BE_PLUGIN=1")
	cmd.Env = append(cmd.Env, env...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &process{cmd: cmd, stderr: new(bytes.Buffer), exited: make(chan error, 1)}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := bufio.NewReader(stdout)
	line, _ := lines.ReadString('\n')
	p.addr = strings.TrimSpace(line)
	go func() {
		_, _ = lines.WriteTo(os.Stdout)
		p.exited <- cmd.Wait()
	}()
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	return p
}

func (p *process) wait(t *testing.T, within time.Duration) int {
	t.Helper()
	select {
	case <-p.exited:
		return p.cmd.ProcessState.ExitCode()
	case <-time.After(within):
		t.Fatalf("the plugin still runs after %s; stderr:\n%s", within, p.stderr)
		return 0
	}
}

func (p *process) dial(t *testing.T) client {
	t.Helper()
	c, err := rpc.DialHTTP("tcp", p.addr)
	if err != nil {
		t.Fatalf("dialing %q: %v", p.addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return client{t, c}
}

func TestProcess(t *testing.T) {
	t.Run("without the token", func(t *testing.T) {
		cmd := exec.Command(os.Args[0])
		cmd.Env = append(os.Environ(), "FAKECLOUD_TEST_BE_PLUGIN=1", "MACHINE_PLUGIN_TOKEN=")
		out, err := cmd.CombinedOutput()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.Contains(string(out), "This is a Docker Machine plugin binary.") {
			t.Fatalf("%v: %s", err, out)
		}
	})
	t.Run("heartbeat", func(t *testing.T) {
		p := startProcess(t, "MACHINE_PLUGIN_TOKEN=42", "FAKECLOUD_HEARTBEAT_TIMEOUT_MS=500")
		if host, _, err := net.SplitHostPort(p.addr); err != nil || host != "127.0.0.1" {
			t.Fatalf("first line %q", p.addr)
		}
		c := p.dial(t)
		for i := 0; i < 10; i++ {
			c.must("Heartbeat", empty, nil)
			time.Sleep(100 * time.Millisecond)
		}
		if code := p.wait(t, 3*time.Second); code != 1 {
			t.Fatalf("exit status %d after the heartbeats stopped", code)
		}
	})
	t.Run("close", func(t *testing.T) {
		p := startProcess(t, "MACHINE_PLUGIN_TOKEN=42")
		c := p.dial(t)
		_ = c.call("Close", empty, nil) // the reply may race the exit
		if code := p.wait(t, 3*time.Second); code != 0 {
			t.Fatalf("exit status %d after Close", code)
		}
	})
	t.Run("crash in create", func(t *testing.T) {
		p := startProcess(t, "MACHINE_PLUGIN_TOKEN=42")
		c := p.dial(t)
		_, provider := machine(t, c, true, map[string]interface{}{"fakecloud-crash-in-create": true})
		if err := c.call("Create", empty, nil); err == nil {
			t.Fatal("Create replied")
		}
		if code := p.wait(t, 3*time.Second); code != 2 {
			t.Fatalf("exit status %d", code)
		}
		if n := len(instances(t, provider)); n != 1 {
			t.Fatalf("%d instances", n)
		}
	})
	t.Run("panic outside create", func(t *testing.T) {
		p := startProcess(t, "MACHINE_PLUGIN_TOKEN=42")
		c := p.dial(t)
		machine(t, c, true, map[string]interface{}{"fakecloud-panic": []string{"Stop"}})
		if err := c.call("Stop", empty, nil); err == nil {
			t.Fatal("Stop replied")
		}
		if code := p.wait(t, 3*time.Second); code != 2 {
			t.Fatalf("exit status %d", code)
		}
	})
	t.Run("env faults", func(t *testing.T) {
		p := startProcess(t, "MACHINE_PLUGIN_TOKEN=42", "FAKECLOUD_API_VERSION=2", "FAKECLOUD_MISSING_METHODS=GetIPv6, GetFlags")
		c := p.dial(t)
		var v int
		c.must("GetVersion", empty, &v)
		if v != 2 {
			t.Fatalf("GetVersion = %d", v)
		}
		if err := c.call("GetFlags", empty, new([]mcnflag.Flag)); err == nil || err.Error() != "rpc: can't find method RPCServerDriver.GetFlags" {
			t.Fatalf("GetFlags: %v", err)
		}
		p = startProcess(t, "MACHINE_PLUGIN_TOKEN=42", "FAKECLOUD_BANNER=hello")
		if p.addr != "hello" {
			t.Fatalf("first line %q", p.addr)
		}
		p = startProcess(t, "MACHINE_PLUGIN_TOKEN=42", "FAKECLOUD_EXIT_AT_START=3")
		if code := p.wait(t, 3*time.Second); code != 3 || p.addr != "" {
			t.Fatalf("exit status %d, first line %q", code, p.addr)
		}
	})
}

// TestProviderFromEnv checks the fake provider's files against what the Rust side
// (FakeCloud in lib.rs) reads and writes: with FAKECLOUD_TEST_PROVIDER_DIR empty it
// makes machine "kept" there; otherwise it checks that machine's state and address
// against FAKECLOUD_TEST_WANT_STATE and FAKECLOUD_TEST_WANT_IP.
func TestProviderFromEnv(t *testing.T) {
	provider := os.Getenv("FAKECLOUD_TEST_PROVIDER_DIR")
	if provider == "" {
		t.Skip("FAKECLOUD_TEST_PROVIDER_DIR is not set")
	}
	d := fakecloud.NewDriver()
	d.MachineName, d.StorePath, d.ProviderDir, d.Token = "kept", t.TempDir(), provider, "s3cret"
	d.SSHHost, d.InstanceType = "127.0.0.1", "large"
	files := instances(t, provider)
	if len(files) == 0 {
		if err := os.MkdirAll(filepath.Join(d.StorePath, "machines", "kept"), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := d.Create(); err != nil {
			t.Fatal(err)
		}
		return
	}
	d.InstanceID = strings.TrimSuffix(filepath.Base(files[0]), ".json")
	s, err := d.GetState()
	if err != nil || s.String() != os.Getenv("FAKECLOUD_TEST_WANT_STATE") {
		t.Fatalf("GetState = %v, %v", s, err)
	}
	ip, err := d.GetIP()
	if err != nil || ip != os.Getenv("FAKECLOUD_TEST_WANT_IP") {
		t.Fatalf("GetIP = %q, %v", ip, err)
	}
}
