// Package rpcdriver serves a driver over Go's net/rpc the way docker/machine's
// libmachine/drivers/rpc does: the same service names, methods, argument and reply
// types, and the same gob registrations (by package name: `*rpcdriver.RPCFlags`,
// `*mcnflag.StringFlag`, ...). The package name is part of the wire format.
package rpcdriver

import (
	"encoding/gob"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"os"
	"runtime/debug"
	"sync"
	"time"

	"machinist.dev/fakecloud/mcnflag"
)

const (
	// APIVersion is what GetVersion answers (libmachine/version.APIVersion).
	APIVersion = 1
	// ServiceNameV0 is the service name of plugins older than docker-machine 0.5.1.
	ServiceNameV0 = "RpcServerDriver"
	// ServiceNameV1 is the service name clients call first.
	ServiceNameV1 = "RPCServerDriver"
)

// Logger carries the debug log (stderr, as libmachine's plugins log with MACHINE_DEBUG).
var Logger = log.New(os.Stderr, "[fakecloud] ", log.LstdFlags|log.Lmicroseconds)

func init() {
	// As libmachine's server_driver.go: gob names a registered pointer type
	// "*<package name>.<type>", and maps the value type to the same name.
	gob.Register(new(RPCFlags))
	gob.Register(new(mcnflag.IntFlag))
	gob.Register(new(mcnflag.StringFlag))
	gob.Register(new(mcnflag.StringSliceFlag))
	gob.Register(new(mcnflag.BoolFlag))
}

// State is a machine's state; GetState replies with it (gob sends it as an int).
type State int

// The states of libmachine/state.
const (
	None State = iota
	Running
	Paused
	Saved
	Stopped
	Stopping
	Starting
	Error
	Timeout
)

var stateNames = []string{"", "Running", "Paused", "Saved", "Stopped", "Stopping", "Starting", "Error", "Timeout"}

func (s State) String() string {
	if s >= 0 && int(s) < len(stateNames) {
		return stateNames[s]
	}
	return ""
}

// ParseState is the inverse of String; unknown names give Error.
func ParseState(name string) State {
	for i, n := range stateNames {
		if n == name {
			return State(i)
		}
	}
	return Error
}

// DriverOptions is how a driver reads the flag values given to SetConfigFromFlags.
type DriverOptions interface {
	String(key string) string
	StringSlice(key string) []string
	Int(key string) int
	Bool(key string) bool
}

// RPCFlags is what clients send to SetConfigFromFlags, inside a DriverOptions
// interface value: flag name to value (string, int, bool or []string).
type RPCFlags struct {
	Values map[string]interface{}
}

// Get returns the value of key, warning (like libmachine) when it is absent.
func (r RPCFlags) Get(key string) interface{} {
	val, ok := r.Values[key]
	if !ok {
		Logger.Printf("Trying to access option %s which does not exist", key)
	}
	return val
}

func (r RPCFlags) String(key string) string {
	val, ok := r.Get(key).(string)
	if !ok {
		Logger.Printf("Type assertion did not go smoothly to string for key %s", key)
	}
	return val
}

func (r RPCFlags) StringSlice(key string) []string {
	val, ok := r.Get(key).([]string)
	if !ok {
		Logger.Printf("Type assertion did not go smoothly to string slice for key %s", key)
	}
	return val
}

func (r RPCFlags) Int(key string) int {
	val, ok := r.Get(key).(int)
	if !ok {
		Logger.Printf("Type assertion did not go smoothly to int for key %s", key)
	}
	return val
}

func (r RPCFlags) Bool(key string) bool {
	val, ok := r.Get(key).(bool)
	if !ok {
		Logger.Printf("Type assertion did not go smoothly to bool for key %s", key)
	}
	return val
}

// Driver is libmachine's drivers.Driver, plus rancher/machine's GetIPv6.
type Driver interface {
	Create() error
	DriverName() string
	GetCreateFlags() []mcnflag.Flag
	GetIP() (string, error)
	GetIPv6() (string, error)
	GetMachineName() string
	GetSSHHostname() (string, error)
	GetSSHKeyPath() string
	GetSSHPort() (int, error)
	GetSSHUsername() string
	GetURL() (string, error)
	GetState() (State, error)
	Kill() error
	PreCreateCheck() error
	Remove() error
	Restart() error
	SetConfigFromFlags(opts DriverOptions) error
	Start() error
	Stop() error
}

// Fault is what a FaultInjector wants done to one call, in this order: wait Delay,
// never return (Hang), panic with Panic, or fail with Err.
type Fault struct {
	Delay time.Duration
	Hang  bool
	Panic string
	Err   string
}

// FaultInjector is implemented by drivers that misbehave on request. FaultFor is
// called (under the server's lock) before every method, Heartbeat and Close included.
type FaultInjector interface {
	FaultFor(method string) Fault
}

// RPCServerDriver is the net/rpc service, registered under both service names.
// Calls run concurrently (net/rpc starts a goroutine per call); the driver itself
// is called under one lock, but fault delays and hangs happen outside it.
type RPCServerDriver struct {
	ActualDriver Driver
	CloseCh      chan bool
	HeartbeatCh  chan bool
	// Version is what GetVersion answers.
	Version int
	// Missing methods answer net/rpc's "rpc: can't find method ..." error.
	Missing map[string]bool

	mu sync.Mutex
}

// NewRPCServerDriver serves d.
func NewRPCServerDriver(d Driver) *RPCServerDriver {
	return &RPCServerDriver{
		ActualDriver: d,
		CloseCh:      make(chan bool),
		HeartbeatCh:  make(chan bool),
		Version:      APIVersion,
		Missing:      map[string]bool{},
	}
}

// call logs the call, applies the process-level and driver-level faults, and runs
// fn under the lock.
func (r *RPCServerDriver) call(method string, fn func(d Driver) error) error {
	return r.serve(method, true, fn)
}

func (r *RPCServerDriver) serve(method string, locked bool, fn func(d Driver) error) error {
	r.mu.Lock()
	name := r.ActualDriver.GetMachineName()
	var fault Fault
	if fi, ok := r.ActualDriver.(FaultInjector); ok {
		fault = fi.FaultFor(method)
	}
	r.mu.Unlock()

	Logger.Printf("(%s) -> %s", name, method)
	if r.Missing[method] {
		err := errors.New("rpc: can't find method " + ServiceNameV1 + "." + method)
		Logger.Printf("(%s) <- %s: %v (FAKECLOUD_MISSING_METHODS)", name, method, err)
		return err
	}
	if fault.Delay > 0 {
		Logger.Printf("(%s) .. %s: slow, waiting %s", name, method, fault.Delay)
		time.Sleep(fault.Delay)
	}
	if fault.Hang {
		Logger.Printf("(%s) .. %s: hanging forever", name, method)
		select {}
	}
	if fault.Panic != "" {
		Logger.Printf("(%s) .. %s: panicking", name, method)
		panic(errors.New(fault.Panic))
	}
	if fault.Err != "" {
		Logger.Printf("(%s) <- %s: injected error %q", name, method, fault.Err)
		return errors.New(fault.Err)
	}

	err := func() error {
		if locked {
			r.mu.Lock()
			defer r.mu.Unlock()
		}
		return fn(r.ActualDriver)
	}()
	if err != nil {
		Logger.Printf("(%s) <- %s: error %q", name, method, err.Error())
	} else {
		Logger.Printf("(%s) <- %s: ok", name, method)
	}
	return err
}

func (r *RPCServerDriver) Close(_, _ *struct{}) error {
	// As libmachine: the main loop exits as soon as it receives, so the reply
	// usually never leaves.
	return r.serve("Close", false, func(Driver) error {
		r.CloseCh <- true
		return nil
	})
}

func (r *RPCServerDriver) GetVersion(_ *struct{}, reply *int) error {
	return r.call("GetVersion", func(Driver) error {
		*reply = r.Version
		return nil
	})
}

func (r *RPCServerDriver) GetConfigRaw(_ *struct{}, reply *[]byte) error {
	return r.call("GetConfigRaw", func(d Driver) error {
		data, err := json.Marshal(d)
		if err != nil {
			return err
		}
		*reply = data
		return nil
	})
}

func (r *RPCServerDriver) GetCreateFlags(_ *struct{}, reply *[]mcnflag.Flag) error {
	return r.call("GetCreateFlags", func(d Driver) error {
		*reply = d.GetCreateFlags()
		return nil
	})
}

// GetFlags is rancher/machine's name for GetCreateFlags.
func (r *RPCServerDriver) GetFlags(_ *struct{}, reply *[]mcnflag.Flag) error {
	return r.call("GetFlags", func(d Driver) error {
		*reply = d.GetCreateFlags()
		return nil
	})
}

func (r *RPCServerDriver) SetConfigRaw(data []byte, _ *struct{}) error {
	return r.call("SetConfigRaw", func(Driver) error {
		return json.Unmarshal(data, &r.ActualDriver)
	})
}

func trapPanic(err *error) {
	if p := recover(); p != nil {
		*err = fmt.Errorf("Panic in the driver: %v\n%s", p, debug.Stack())
	}
}

// Create turns a panic of the driver into the call's error, as libmachine does; a
// panic in any other method kills the plugin.
func (r *RPCServerDriver) Create(_, _ *struct{}) (err error) {
	defer trapPanic(&err)
	// Unlocked, as libmachine's server is: other calls (GetConfigRaw, GetState) are
	// answered while Create runs.
	return r.serve("Create", false, func(d Driver) error { return d.Create() })
}

func (r *RPCServerDriver) DriverName(_ *struct{}, reply *string) error {
	return r.call("DriverName", func(d Driver) error {
		*reply = d.DriverName()
		return nil
	})
}

func (r *RPCServerDriver) GetIP(_ *struct{}, reply *string) error {
	return r.call("GetIP", func(d Driver) (err error) {
		*reply, err = d.GetIP()
		return err
	})
}

// GetIPv6 is rancher/machine's.
func (r *RPCServerDriver) GetIPv6(_ *struct{}, reply *string) error {
	return r.call("GetIPv6", func(d Driver) (err error) {
		*reply, err = d.GetIPv6()
		return err
	})
}

func (r *RPCServerDriver) GetMachineName(_ *struct{}, reply *string) error {
	return r.call("GetMachineName", func(d Driver) error {
		*reply = d.GetMachineName()
		return nil
	})
}

func (r *RPCServerDriver) GetSSHHostname(_ *struct{}, reply *string) error {
	return r.call("GetSSHHostname", func(d Driver) (err error) {
		*reply, err = d.GetSSHHostname()
		return err
	})
}

func (r *RPCServerDriver) GetSSHKeyPath(_ *struct{}, reply *string) error {
	return r.call("GetSSHKeyPath", func(d Driver) error {
		*reply = d.GetSSHKeyPath()
		return nil
	})
}

func (r *RPCServerDriver) GetSSHPort(_ *struct{}, reply *int) error {
	return r.call("GetSSHPort", func(d Driver) (err error) {
		*reply, err = d.GetSSHPort()
		return err
	})
}

func (r *RPCServerDriver) GetSSHUsername(_ *struct{}, reply *string) error {
	return r.call("GetSSHUsername", func(d Driver) error {
		*reply = d.GetSSHUsername()
		return nil
	})
}

func (r *RPCServerDriver) GetURL(_ *struct{}, reply *string) error {
	return r.call("GetURL", func(d Driver) (err error) {
		*reply, err = d.GetURL()
		return err
	})
}

func (r *RPCServerDriver) GetState(_ *struct{}, reply *State) error {
	return r.call("GetState", func(d Driver) (err error) {
		*reply, err = d.GetState()
		return err
	})
}

func (r *RPCServerDriver) Kill(_, _ *struct{}) error {
	return r.call("Kill", func(d Driver) error { return d.Kill() })
}

func (r *RPCServerDriver) PreCreateCheck(_, _ *struct{}) error {
	return r.call("PreCreateCheck", func(d Driver) error { return d.PreCreateCheck() })
}

func (r *RPCServerDriver) Remove(_, _ *struct{}) error {
	return r.call("Remove", func(d Driver) error { return d.Remove() })
}

func (r *RPCServerDriver) Restart(_, _ *struct{}) error {
	return r.call("Restart", func(d Driver) error { return d.Restart() })
}

// SetConfigFromFlags takes a pointer to an interface, as libmachine's client sends
// `&flags` with flags a DriverOptions holding an RPCFlags.
func (r *RPCServerDriver) SetConfigFromFlags(flags *DriverOptions, _ *struct{}) error {
	return r.call("SetConfigFromFlags", func(d Driver) error { return d.SetConfigFromFlags(*flags) })
}

func (r *RPCServerDriver) Start(_, _ *struct{}) error {
	return r.call("Start", func(d Driver) error { return d.Start() })
}

func (r *RPCServerDriver) Stop(_, _ *struct{}) error {
	return r.call("Stop", func(d Driver) error { return d.Stop() })
}

func (r *RPCServerDriver) Heartbeat(_, _ *struct{}) error {
	return r.serve("Heartbeat", false, func(Driver) error {
		r.HeartbeatCh <- true
		return nil
	})
}
