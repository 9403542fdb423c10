// Package fakecloud is a Docker Machine driver for a fake cloud whose state is a
// directory of JSON files (one per instance) that outlives the plugin processes, like
// a real provider's API. It behaves like docker-machine's cloud drivers (amazonec2):
// Create generates an SSH key in the machine's store directory and makes an instance,
// GetState and GetIP ask the provider live, Remove deletes the instance, and the
// driver's JSON keeps a credential (Token) in plain text. Fault flags make it slow,
// failing, hanging, panicking or crashing on chosen methods.
package fakecloud

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"machinist.dev/fakecloud/mcnflag"
	"machinist.dev/fakecloud/rpcdriver"
)

// Name is the driver's name (DriverName) and the prefix of its flags.
const Name = "fakecloud"

// BaseDriver has the fields (and JSON names) of libmachine's drivers.BaseDriver.
type BaseDriver struct {
	IPAddress      string
	MachineName    string
	SSHUser        string
	SSHPort        int
	SSHKeyPath     string
	StorePath      string
	SwarmMaster    bool
	SwarmHost      string
	SwarmDiscovery string
}

// ResolveStorePath is `<StorePath>/machines/<MachineName>/<file>`.
func (d *BaseDriver) ResolveStorePath(file string) string {
	return filepath.Join(d.StorePath, "machines", d.MachineName, file)
}

// Driver is the fake cloud's driver. Its JSON (GetConfigRaw) is BaseDriver's fields
// followed by these.
type Driver struct {
	*BaseDriver
	InstanceID         string
	Token              string // the secret flag's value, kept like amazonec2 keeps SecretKey
	ProviderDir        string
	InstanceType       string
	DiskSize           int
	Tags               []string
	PrivateNetwork     bool
	SSHHost            string
	AuthorizedKeysFile string
	Slow               []string // Method=milliseconds
	Fail               []string // Method=message
	Hang               []string // Method
	Panic              []string // Method or Method=message
	CrashInCreate      bool
	BootMillis         int
	FindByName         bool
}

// NewDriver returns an empty driver, as plugin mains do (amazonec2.NewDriver("", "")).
func NewDriver() *Driver {
	return &Driver{BaseDriver: &BaseDriver{}}
}

// Flag names.
const (
	FlagToken              = "fakecloud-token"
	FlagProviderDir        = "fakecloud-provider-dir"
	FlagInstanceType       = "fakecloud-instance-type"
	FlagDiskSize           = "fakecloud-disk-size"
	FlagTags               = "fakecloud-tags"
	FlagPrivateNetwork     = "fakecloud-private-network"
	FlagSSHUser            = "fakecloud-ssh-user"
	FlagSSHPort            = "fakecloud-ssh-port"
	FlagSSHHost            = "fakecloud-ssh-host"
	FlagAuthorizedKeysFile = "fakecloud-authorized-keys-file"
	FlagSlow               = "fakecloud-slow"
	FlagFail               = "fakecloud-fail"
	FlagHang               = "fakecloud-hang"
	FlagPanic              = "fakecloud-panic"
	FlagCrashInCreate      = "fakecloud-crash-in-create"
	FlagBootMillis         = "fakecloud-boot-millis"
	FlagFindByName         = "fakecloud-find-by-name"
)

// CreateFlags is what GetCreateFlags answers, in this order.
func CreateFlags() []mcnflag.Flag {
	return []mcnflag.Flag{
		mcnflag.StringFlag{Name: FlagToken, Usage: "API token of the fake cloud (required)", EnvVar: "FAKECLOUD_TOKEN"},
		mcnflag.StringFlag{Name: FlagProviderDir, Usage: "Directory holding the fake cloud's instances", EnvVar: "FAKECLOUD_PROVIDER_DIR"},
		mcnflag.StringFlag{Name: FlagInstanceType, Usage: "Instance type", EnvVar: "FAKECLOUD_INSTANCE_TYPE", Value: "small"},
		mcnflag.IntFlag{Name: FlagDiskSize, Usage: "Disk size in GB", EnvVar: "FAKECLOUD_DISK_SIZE", Value: 10},
		mcnflag.StringSliceFlag{Name: FlagTags, Usage: "Instance tags (key=value)", EnvVar: "FAKECLOUD_TAGS"},
		mcnflag.BoolFlag{Name: FlagPrivateNetwork, Usage: "Attach a private network", EnvVar: "FAKECLOUD_PRIVATE_NETWORK"},
		mcnflag.StringFlag{Name: FlagSSHUser, Usage: "SSH user", EnvVar: "FAKECLOUD_SSH_USER", Value: "root"},
		mcnflag.IntFlag{Name: FlagSSHPort, Usage: "SSH port", EnvVar: "FAKECLOUD_SSH_PORT", Value: 22},
		mcnflag.StringFlag{Name: FlagSSHHost, Usage: "Address of the instances", EnvVar: "FAKECLOUD_SSH_HOST", Value: "127.0.0.1"},
		mcnflag.StringFlag{Name: FlagAuthorizedKeysFile, Usage: "Create appends the generated public key to this file", EnvVar: "FAKECLOUD_AUTHORIZED_KEYS_FILE"},
		mcnflag.StringSliceFlag{Name: FlagSlow, Usage: "Method=milliseconds: that method waits first", EnvVar: "FAKECLOUD_SLOW"},
		mcnflag.StringSliceFlag{Name: FlagFail, Usage: "Method=message: that method fails with that message", EnvVar: "FAKECLOUD_FAIL"},
		mcnflag.StringSliceFlag{Name: FlagHang, Usage: "Method: that method never returns", EnvVar: "FAKECLOUD_HANG"},
		mcnflag.StringSliceFlag{Name: FlagPanic, Usage: "Method[=message]: that method panics", EnvVar: "FAKECLOUD_PANIC"},
		mcnflag.BoolFlag{Name: FlagCrashInCreate, Usage: "Create makes the instance, then the plugin exits 2 before replying", EnvVar: "FAKECLOUD_CRASH_IN_CREATE"},
		mcnflag.IntFlag{Name: FlagBootMillis, Usage: "Create records the instance id, then waits this long for it to boot (as amazonec2 waits for running)", EnvVar: "FAKECLOUD_BOOT_MILLIS"},
		mcnflag.StringFlag{Name: FlagFindByName, Usage: "\"false\": the instance is found by its id only, never by machine name", EnvVar: "FAKECLOUD_FIND_BY_NAME", Value: "true"},
	}
}

func (d *Driver) DriverName() string             { return Name }
func (d *Driver) GetCreateFlags() []mcnflag.Flag { return CreateFlags() }
func (d *Driver) GetMachineName() string         { return d.MachineName }

func (d *Driver) SetConfigFromFlags(opts rpcdriver.DriverOptions) error {
	d.Token = opts.String(FlagToken)
	d.ProviderDir = opts.String(FlagProviderDir)
	d.InstanceType = opts.String(FlagInstanceType)
	d.DiskSize = opts.Int(FlagDiskSize)
	d.Tags = opts.StringSlice(FlagTags)
	d.PrivateNetwork = opts.Bool(FlagPrivateNetwork)
	d.SSHUser = opts.String(FlagSSHUser)
	d.SSHPort = opts.Int(FlagSSHPort)
	d.SSHHost = opts.String(FlagSSHHost)
	d.AuthorizedKeysFile = opts.String(FlagAuthorizedKeysFile)
	d.Slow = opts.StringSlice(FlagSlow)
	d.Fail = opts.StringSlice(FlagFail)
	d.Hang = opts.StringSlice(FlagHang)
	d.Panic = opts.StringSlice(FlagPanic)
	d.CrashInCreate = opts.Bool(FlagCrashInCreate)
	d.BootMillis = opts.Int(FlagBootMillis)
	d.FindByName = opts.String(FlagFindByName) != "false"
	for _, s := range d.Slow {
		if _, _, err := parseSlow(s); err != nil {
			return err
		}
	}
	for _, f := range d.Fail {
		if m, msg, ok := strings.Cut(f, "="); !ok || m == "" || msg == "" {
			return fmt.Errorf("%s: bad entry %q (want Method=message)", FlagFail, f)
		}
	}
	return nil
}

func parseSlow(s string) (string, time.Duration, error) {
	m, ms, ok := strings.Cut(s, "=")
	n, err := strconv.Atoi(ms)
	if !ok || m == "" || err != nil || n < 0 {
		return "", 0, fmt.Errorf("%s: bad entry %q (want Method=milliseconds)", FlagSlow, s)
	}
	return m, time.Duration(n) * time.Millisecond, nil
}

// FaultFor implements rpcdriver.FaultInjector from the fault flags.
func (d *Driver) FaultFor(method string) rpcdriver.Fault {
	var f rpcdriver.Fault
	for _, s := range d.Slow {
		if m, delay, err := parseSlow(s); err == nil && m == method {
			f.Delay = delay
		}
	}
	for _, m := range d.Hang {
		if m == method {
			f.Hang = true
		}
	}
	for _, p := range d.Panic {
		m, msg, _ := strings.Cut(p, "=")
		if m == method {
			if msg == "" {
				msg = "fakecloud: injected panic in " + method
			}
			f.Panic = msg
		}
	}
	for _, e := range d.Fail {
		if m, msg, _ := strings.Cut(e, "="); m == method {
			f.Err = msg
		}
	}
	return f
}

func (d *Driver) provider() (*provider, error) {
	return openProvider(d.ProviderDir, d.Token)
}

func (d *Driver) PreCreateCheck() error {
	if d.Token == "" {
		return errors.New("fakecloud-token is required")
	}
	if d.ProviderDir == "" {
		return errors.New("fakecloud-provider-dir is required")
	}
	_, err := d.provider()
	return err
}

// Create generates the SSH key in the machine's store directory (failing, like
// docker-machine's drivers, when that directory does not exist), authorizes it in
// AuthorizedKeysFile if set, and makes a Running instance.
func (d *Driver) Create() error {
	p, err := d.provider()
	if err != nil {
		return err
	}
	fmt.Println("Creating SSH key...")
	keyPath := d.ResolveStorePath("id_rsa")
	pub, err := generateSSHKey(keyPath)
	if err != nil {
		return fmt.Errorf("unable to create key pair: %s", err)
	}
	d.SSHKeyPath = keyPath
	if d.AuthorizedKeysFile != "" {
		if err := appendLine(d.AuthorizedKeysFile, pub); err != nil {
			return fmt.Errorf("authorizing the key in %s: %s", d.AuthorizedKeysFile, err)
		}
	}

	host := d.SSHHost
	if host == "" {
		host = "127.0.0.1"
	}
	inst := &Instance{
		ID:           "fc-" + randomHex(8),
		State:        rpcdriver.Running.String(),
		IP:           host,
		MachineName:  d.MachineName,
		InstanceType: d.InstanceType,
		Created:      time.Now().UTC().Format(time.RFC3339Nano),
	}
	fmt.Printf("Launching instance %s...\n", inst.ID)
	if err := p.put(inst); err != nil {
		return fmt.Errorf("error launching instance: %s", err)
	}
	if d.CrashInCreate {
		rpcdriver.Logger.Printf("(%s) Create: instance %s made, crashing (fakecloud-crash-in-create)", d.MachineName, inst.ID)
		os.Exit(2)
	}
	d.InstanceID = inst.ID
	d.IPAddress = inst.IP
	if d.BootMillis > 0 {
		// As amazonec2 after RunInstances: the id is known (GetConfigRaw shows it), the
		// instance is still starting.
		inst.State = rpcdriver.Starting.String()
		if err := p.put(inst); err != nil {
			return err
		}
		time.Sleep(time.Duration(d.BootMillis) * time.Millisecond)
		inst.State = rpcdriver.Running.String()
		if err := p.put(inst); err != nil {
			return err
		}
	}
	fmt.Printf("Instance %s is running at %s\n", inst.ID, inst.IP)
	return nil
}

func appendLine(path, line string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if !strings.HasSuffix(line, "\n") {
		line += "\n"
	}
	if _, err := f.WriteString(line); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// instance asks the provider for the driver's instance.
// instance is the machine's instance: by its id, or, before Create recorded one (a
// Create that crashed), by the machine's name.
func (d *Driver) instance() (*provider, *Instance, error) {
	p, err := d.provider()
	if err != nil {
		return nil, nil, err
	}
	if d.InstanceID == "" {
		if !d.FindByName {
			return p, nil, errNotFound
		}
		inst, err := p.byMachineName(d.MachineName)
		if err == nil {
			d.InstanceID = inst.ID
			d.IPAddress = inst.IP
		}
		return p, inst, err
	}
	inst, err := p.get(d.InstanceID)
	return p, inst, err
}

// GetState answers the provider's state; Error (7), without an error, when the
// instance is gone or was never made (as amazonec2 does after Remove).
func (d *Driver) GetState() (rpcdriver.State, error) {
	_, inst, err := d.instance()
	if errors.Is(err, errNotFound) {
		return rpcdriver.Error, nil
	}
	if err != nil {
		return rpcdriver.Error, err
	}
	return rpcdriver.ParseState(inst.State), nil
}

// GetIP answers the provider's address, live.
func (d *Driver) GetIP() (string, error) {
	_, inst, err := d.instance()
	if errors.Is(err, errNotFound) || (err == nil && inst.IP == "") {
		return "", errors.New("IP address is not set")
	}
	if err != nil {
		return "", err
	}
	return inst.IP, nil
}

// GetIPv6 (rancher/machine): the fake cloud has no IPv6.
func (d *Driver) GetIPv6() (string, error) {
	return "", errors.New("IPv6 address is not set")
}

func (d *Driver) GetSSHHostname() (string, error) { return d.GetIP() }

func (d *Driver) GetSSHKeyPath() string {
	if d.SSHKeyPath == "" {
		d.SSHKeyPath = d.ResolveStorePath("id_rsa")
	}
	return d.SSHKeyPath
}

func (d *Driver) GetSSHPort() (int, error) {
	if d.SSHPort == 0 {
		d.SSHPort = 22
	}
	return d.SSHPort, nil
}

func (d *Driver) GetSSHUsername() string {
	if d.SSHUser == "" {
		d.SSHUser = "root"
	}
	return d.SSHUser
}

func (d *Driver) GetURL() (string, error) {
	ip, err := d.GetIP()
	if err != nil {
		return "", err
	}
	return "tcp://" + net.JoinHostPort(ip, "2376"), nil
}

// setState moves the instance to a new state; an error when it is gone.
func (d *Driver) setState(s rpcdriver.State) error {
	p, inst, err := d.instance()
	if errors.Is(err, errNotFound) {
		if d.InstanceID == "" {
			return errors.New("fakecloud: no instance was created")
		}
		return fmt.Errorf("fakecloud: instance %s not found", d.InstanceID)
	}
	if err != nil {
		return err
	}
	inst.State = s.String()
	return p.put(inst)
}

func (d *Driver) Start() error   { return d.setState(rpcdriver.Running) }
func (d *Driver) Stop() error    { return d.setState(rpcdriver.Stopped) }
func (d *Driver) Kill() error    { return d.setState(rpcdriver.Stopped) }
func (d *Driver) Restart() error { return d.setState(rpcdriver.Running) }

// Remove deletes the instance; removing one that is gone (or was never made)
// succeeds. The key files in the store directory stay, as with docker-machine's
// drivers (docker-machine deletes that directory itself).
func (d *Driver) Remove() error {
	p, inst, err := d.instance()
	if errors.Is(err, errNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	return p.delete(inst.ID)
}
