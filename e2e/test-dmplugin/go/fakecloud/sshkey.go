package fakecloud

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
)

// generateSSHKey behaves like libmachine's ssh.GenerateSSHKey: it keeps a key that
// already exists at path, else writes a new RSA 2048 key (PEM "RSA PRIVATE KEY",
// PKCS#1, mode 0600) and path+".pub" (OpenSSH authorized_keys format). It fails
// when the directory does not exist. Returns the public key line.
func generateSSHKey(path string) (string, error) {
	if _, err := os.Stat(path); err == nil {
		pub, err := os.ReadFile(path + ".pub")
		if err != nil {
			return "", fmt.Errorf("Error reading public key: %s", err)
		}
		return string(pub), nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("Desired directory for SSH keys does not exist: %s", err)
	}

	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return "", errors.New("Error generating key pair: Unable to generate key")
	}
	privPEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(priv)})
	pub := authorizedKey(&priv.PublicKey)

	for _, f := range []struct {
		path string
		data []byte
	}{{path, privPEM}, {path + ".pub", []byte(pub)}} {
		if err := os.WriteFile(f.path, f.data, 0o600); err != nil {
			return "", fmt.Errorf("Error writing keys to file(s): %s", err)
		}
	}
	return pub, nil
}

// authorizedKey renders "ssh-rsa <base64 of the RFC 4253 wire form>\n", what
// golang.org/x/crypto/ssh's MarshalAuthorizedKey writes for an RSA key.
func authorizedKey(pub *rsa.PublicKey) string {
	var blob []byte
	blob = appendString(blob, []byte("ssh-rsa"))
	blob = appendString(blob, mpint(big.NewInt(int64(pub.E))))
	blob = appendString(blob, mpint(pub.N))
	return "ssh-rsa " + base64.StdEncoding.EncodeToString(blob) + "\n"
}

func appendString(b, s []byte) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

// mpint is RFC 4251's encoding of a positive integer: big-endian, with a leading
// zero byte when the top bit is set.
func mpint(n *big.Int) []byte {
	b := n.Bytes()
	if len(b) > 0 && b[0]&0x80 != 0 {
		b = append([]byte{0}, b...)
	}
	return b
}
