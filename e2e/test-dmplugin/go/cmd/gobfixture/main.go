// Command gobfixture gives tests gob bytes made by Go's own encoding/gob and net/rpc
// types, and decodes bytes made by someone else the way a plugin's net/rpc server
// would.
//
//	gobfixture list             the case names, one a line
//	gobfixture encode <case>    writes that case's stream to stdout
//	gobfixture decode <kind>    reads a stream from stdin, prints what it decoded
//
// Each case is one stream written by a single gob.Encoder, as net/rpc's codecs write
// a connection: a Request (client) or Response (server) header, then the body.
// Decoding uses one gob.Decoder over stdin, like net/rpc's server codec. See
// e2e/test-dmplugin/src/lib.rs for the cases and the output format.
package main

import (
	"bufio"
	"encoding/gob"
	"errors"
	"fmt"
	"io"
	"net/rpc"
	"os"
	"sort"
	"strings"

	"machinist.dev/fakecloud/fakecloud"
	"machinist.dev/fakecloud/mcnflag"
	"machinist.dev/fakecloud/rpcdriver"
)

// fixtureFlags holds one flag of each type, every field set, plus a flag with every
// optional field empty (gob leaves zero fields out).
func fixtureFlags() []mcnflag.Flag {
	return []mcnflag.Flag{
		mcnflag.StringFlag{Name: "fixture-string", Usage: "a string flag", EnvVar: "FIXTURE_STRING", Value: "default"},
		mcnflag.StringSliceFlag{Name: "fixture-list", Usage: "a list flag", EnvVar: "FIXTURE_LIST", Value: []string{"a", "b"}},
		mcnflag.IntFlag{Name: "fixture-int", Usage: "an int flag", EnvVar: "FIXTURE_INT", Value: 42},
		mcnflag.BoolFlag{Name: "fixture-bool", Usage: "a bool flag", EnvVar: "FIXTURE_BOOL"},
		mcnflag.StringFlag{Name: "fixture-empty"},
	}
}

type msgs []interface{}

func request(method string, seq uint64) *rpc.Request {
	return &rpc.Request{ServiceMethod: rpcdriver.ServiceNameV1 + "." + method, Seq: seq}
}

func response(method string, seq uint64, errMsg string) *rpc.Response {
	return &rpc.Response{ServiceMethod: rpcdriver.ServiceNameV1 + "." + method, Seq: seq, Error: errMsg}
}

// cases: each is the sequence of values one encoder writes. Arguments are what
// libmachine's client passes to Call (struct{}{}, []byte, &flags); replies are what
// net/rpc's server encodes (a pointer to the reply, or struct{}{} after an error).
func cases() map[string]msgs {
	empty := struct{}{}
	flags := fixtureFlags()
	fcFlags := fakecloud.CreateFlags()
	port, negative, version := 2222, -2222, 1
	ip := "127.0.0.1"
	raw := []byte(`{"MachineName":"m1","StorePath":"/tmp/store"}`)
	state := rpcdriver.Error
	var opts rpcdriver.DriverOptions = rpcdriver.RPCFlags{Values: map[string]interface{}{
		"fakecloud-token":           "s3cret",
		"fakecloud-disk-size":       20,
		"fakecloud-private-network": true,
		"fakecloud-tags":            []string{"a", "b"},
	}}
	var oneOpt rpcdriver.DriverOptions = rpcdriver.RPCFlags{Values: map[string]interface{}{"fakecloud-token": "s3cret"}}
	return map[string]msgs{
		"request":                       {request("GetCreateFlags", 7), empty},
		"request-set-config-raw":        {request("SetConfigRaw", 8), raw},
		"set-config-from-flags":         {request("SetConfigFromFlags", 9), &opts},
		"set-config-from-flags-one":     {request("SetConfigFromFlags", 9), &oneOpt},
		"request-stream":                {request("GetVersion", 0), empty, request("SetConfigRaw", 1), raw, request("GetCreateFlags", 2), empty, request("SetConfigFromFlags", 3), &oneOpt, request("Create", 4), empty},
		"response-create-flags":         {response("GetCreateFlags", 7, ""), &flags},
		"response-fakecloud-flags":      {response("GetCreateFlags", 2, ""), &fcFlags},
		"response-error":                {response("Create", 4, "fakecloud-token is required"), empty},
		"response-empty":                {response("Heartbeat", 5, ""), empty},
		"response-version":              {response("GetVersion", 0, ""), &version},
		"response-int":                  {response("GetSSHPort", 6, ""), &port},
		"response-int-negative":         {response("GetSSHPort", 6, ""), &negative},
		"response-state":                {response("GetState", 10, ""), &state},
		"response-string":               {response("GetIP", 11, ""), &ip},
		"response-bytes":                {response("GetConfigRaw", 12, ""), &raw},
		"response-stream":               {response("GetVersion", 0, ""), &version, response("GetCreateFlags", 2, ""), &flags, response("Create", 4, "boom"), empty, response("GetIP", 11, ""), &ip, response("GetCreateFlags", 13, ""), &flags},
		"response-error-missing-method": {response("GetIPv6", 14, "rpc: can't find method RPCServerDriver.GetIPv6"), empty},
	}
}

func encode(name string) error {
	c, ok := cases()[name]
	if !ok {
		return fmt.Errorf("no case %q (gobfixture list)", name)
	}
	w := bufio.NewWriter(os.Stdout)
	enc := gob.NewEncoder(w)
	for _, v := range c {
		if err := enc.Encode(v); err != nil {
			return err
		}
	}
	return w.Flush()
}

// body decodes a request's argument as type kind ("empty", "raw", "flags") and
// renders it.
func body(dec *gob.Decoder, kind string) (string, error) {
	switch kind {
	case "empty":
		var v struct{}
		if err := dec.Decode(&v); err != nil {
			return "", err
		}
		return "argument struct{}\n", nil
	case "raw":
		var v []byte
		if err := dec.Decode(&v); err != nil {
			return "", err
		}
		return fmt.Sprintf("argument []byte %q\n", v), nil
	case "flags":
		var opts rpcdriver.DriverOptions
		if err := dec.Decode(&opts); err != nil {
			return "", err
		}
		var b strings.Builder
		fmt.Fprintf(&b, "argument %T\n", opts)
		if f, ok := opts.(*rpcdriver.RPCFlags); ok {
			keys := make([]string, 0, len(f.Values))
			for k := range f.Values {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				fmt.Fprintf(&b, "%s=%#v (%T)\n", k, f.Values[k], f.Values[k])
			}
		}
		return b.String(), nil
	}
	panic("unknown body kind " + kind)
}

// kindFor is the argument type the server gives a method.
func kindFor(serviceMethod string) string {
	switch {
	case strings.HasSuffix(serviceMethod, ".SetConfigRaw"):
		return "raw"
	case strings.HasSuffix(serviceMethod, ".SetConfigFromFlags"):
		return "flags"
	}
	return "empty"
}

func decodeOne(dec *gob.Decoder, kind string) (string, error) {
	var req rpc.Request
	if err := dec.Decode(&req); err != nil {
		return "", err
	}
	if kind == "" {
		kind = kindFor(req.ServiceMethod)
	}
	b, err := body(dec, kind)
	if err != nil {
		return "", fmt.Errorf("body of %s: %w", req.ServiceMethod, err)
	}
	return fmt.Sprintf("request %s seq=%d\n%s", req.ServiceMethod, req.Seq, b), nil
}

func decode(kind string) error {
	dec := gob.NewDecoder(bufio.NewReader(os.Stdin))
	single := map[string]string{
		"request-empty":                 "empty",
		"request-set-config-raw":        "raw",
		"request-set-config-from-flags": "flags",
	}
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	if k, ok := single[kind]; ok {
		s, err := decodeOne(dec, k)
		if err != nil {
			return err
		}
		var extra struct{}
		if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
			return fmt.Errorf("data after the request (%v)", err)
		}
		_, err = out.WriteString(s)
		return err
	}
	if kind != "requests" {
		return fmt.Errorf("no decode kind %q (request-empty, request-set-config-raw, request-set-config-from-flags, requests)", kind)
	}
	for {
		s, err := decodeOne(dec, "")
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if _, err := out.WriteString(s); err != nil {
			return err
		}
	}
}

func main() {
	var err error
	switch {
	case len(os.Args) == 2 && os.Args[1] == "list":
		names := make([]string, 0)
		for n := range cases() {
			names = append(names, n)
		}
		sort.Strings(names)
		fmt.Println(strings.Join(names, "\n"))
	case len(os.Args) == 3 && os.Args[1] == "encode":
		err = encode(os.Args[2])
	case len(os.Args) == 3 && os.Args[1] == "decode":
		err = decode(os.Args[2])
	default:
		err = errors.New("usage: gobfixture list | encode <case> | decode <kind>")
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "gobfixture: %v\n", err)
		os.Exit(1)
	}
}
